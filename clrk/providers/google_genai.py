"""Google Gemini API (generativelanguage.googleapis.com).

`models/M:generateContent` and `:streamGenerateContent` (SSE with `alt=sse`, else a streamed JSON array)
-> chat; `:embedContent` / `:batchEmbedContents` -> embeddings. The model comes from the path.
`usageMetadata` is a running total in a stream: the last one counts. Per the semconv, output tokens are
candidates + thoughts.

Budget estimate: `generationConfig.maxOutputTokens` per candidate times `candidateCount`; `cachedContent` is
input the provider holds. The API reads its JSON as proto3 does: snake_case names too, numbers as strings,
0 meaning unset. Its OpenAI-compatible endpoint takes `max_tokens` and `n`. Batch jobs
(`:batchGenerateContent`, `:asyncBatchEmbedContent`) are billed after the answer.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from clrk.hostnames import loose_path
from clrk.providers.base import ProviderParser, as_int, loads, object_after_key

_PATH = re.compile(r"/(?:models|tunedModels)/([^/:]+):(generateContent|streamGenerateContent|embedContent|batchEmbedContents)$")
_PATH_MODEL = re.compile(r"(/(?:models|tunedModels)/)[^/:]+(:)")  # the model segment, as the path spells it
_OPS = {
    "generateContent": "chat",
    "streamGenerateContent": "chat",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
}


class GoogleGenAIParser(ProviderParser):
    name = "google_genai"
    system = "google_genai"
    provider_name = "gcp.gemini"
    hosts = ("generativelanguage.googleapis.com",)

    @classmethod
    def operation(cls, path: str) -> tuple[str, str | None] | None:
        m = _PATH.search(unquote(path))
        if m is None:
            return None
        return _OPS[m.group(2)], m.group(1)

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str) -> None:
        super().__init__(operation, path_model, path, query)  # (named, not *args: a parser is made per call)
        if self.path.endswith(":streamGenerateContent"):
            self.result.stream = True

    def on_request(self, doc: dict) -> None:
        # The OpenAI-compatible endpoint (/v1beta/openai/...) takes OpenAI's fields; the native API refuses them.
        cap = self.largest_count(doc, ("max_completion_tokens", "max_tokens"))
        caps, choices = [cap] if cap is not None else [], self.count(doc, "n") or 1
        for cfg in (doc.get("generationConfig"), doc.get("generation_config")):
            if isinstance(cfg, dict):
                if (v := self.largest_count(cfg, ("maxOutputTokens", "max_output_tokens"), zero_unset=True)) is not None:
                    caps.append(v)
                choices = max(choices, self.largest_count(cfg, ("candidateCount", "candidate_count"), zero_unset=True) or 1)
        self.max_output_tokens = max(caps) if caps else None
        self.choices = choices
        if doc.get("cachedContent") or doc.get("cached_content"):
            self.server_context = "cachedContent"
        if unquote(loose_path(self.path)).endswith((":batchGenerateContent", ":asyncBatchEmbedContent")):
            self.unbudgetable = "batch jobs are billed after this request is answered"

    def model_change(self, model: str) -> tuple[str | None, dict[str, Any]]:
        # The model is named by the path; the body is left as it is.
        path = _PATH_MODEL.sub(lambda m: m.group(1) + model + m.group(2), self.path, count=1)
        return (None if path == self.path else path), {}

    def _usage(self, u: Any) -> None:
        if not isinstance(u, dict):
            return
        r = self.result
        prompt = as_int(u.get("promptTokenCount"))
        candidates = as_int(u.get("candidatesTokenCount"))
        thoughts = as_int(u.get("thoughtsTokenCount"))
        if prompt is None and candidates is None and thoughts is None:
            return
        r.input_tokens = prompt
        r.output_tokens = (candidates or 0) + (thoughts or 0) if (candidates is not None or thoughts is not None) else None
        r.reasoning_tokens = thoughts
        r.cache_read_tokens = as_int(u.get("cachedContentTokenCount"))
        r.usage_visible = True

    def _chunk(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        if isinstance(doc.get("error"), dict):
            self.on_error(doc)
            return
        if isinstance(doc.get("responseId"), str):
            self.result.response_id = doc["responseId"]
        if isinstance(doc.get("modelVersion"), str):
            self.result.response_model = doc["modelVersion"]
        cands = doc.get("candidates")
        if isinstance(cands, list):
            reasons = [c["finishReason"] for c in cands if isinstance(c, dict) and isinstance(c.get("finishReason"), str)]
            if reasons:
                self.result.finish_reasons = reasons
        self._usage(doc.get("usageMetadata"))

    def on_json(self, doc: Any) -> None:
        # :streamGenerateContent without alt=sse streams one JSON array of chunks.
        for chunk in doc if isinstance(doc, list) else [doc]:
            self._chunk(chunk)

    def on_event(self, event: str, data: str) -> None:
        self._chunk(loads(data))

    def on_error(self, doc: Any) -> None:
        for d in doc if isinstance(doc, list) else [doc]:
            err = d.get("error") if isinstance(d, dict) else None
            if isinstance(err, dict):
                self.result.error_type = str(err.get("status") or err.get("code") or "error")[:64]  # the upstream writes it: bounded
                return

    def on_truncated_json(self, tail: str) -> None:
        self._usage(object_after_key(tail, "usageMetadata"))
        model = object_after_key(tail, "modelVersion")
        if isinstance(model, str):
            self.result.response_model = model
        rid = object_after_key(tail, "responseId")
        if isinstance(rid, str):
            self.result.response_id = rid
