"""A fake model provider on a FakeUpstream: OpenAI, Anthropic and Gemini endpoints as the official SDKs call
them. The request's model name picks a behaviour, so a test drives it through the SDK alone:

  ...-error   the provider's error body (429 / 529 / 400)
  ...-cut     a stream (or JSON body) that dies mid-way
  ...-big     a JSON body of several MB whose usage sits at the end
  ...-slow    a stream paced 0.6 s per event; `upstream.sse_done` is set after the last one
  ...-wait    a JSON answer after 0.5 s (keeps concurrent requests in flight together)
  ...-hold    a JSON answer once the test sets `RELEASE` (at most 20 s): requests stay in flight until then
  ...-costN   a JSON answer whose usage reports N prompt tokens (and 5 completion tokens)
"""

from __future__ import annotations

import json
import re
import threading
import time

from tests.harness import provider_bodies as B

PACE = 0.6
RELEASE = threading.Event()


def race_held(calls: list, upstream, model: str, timeout: float = 30.0, while_held=None) -> list:
    """Makes every call in `calls` (functions returning an httpx response) at once, with the provider holding
    each one it receives until every call was either refused (429) or reached it: so each admission is
    decided while all the others are reserved. `while_held`, if given, is called then, before the provider
    lets them go. Returns the answers."""
    from concurrent.futures import ThreadPoolExecutor

    answers: list = []
    RELEASE.clear()
    with ThreadPoolExecutor(len(calls)) as ex:
        try:
            futures = [ex.submit(lambda c=c: answers.append(c())) for c in calls]
            deadline = time.monotonic() + timeout
            while sum(a.status_code == 429 for a in answers) + len(upstream.requests_with(model)) < len(calls):
                assert time.monotonic() < deadline, [a.status_code for a in answers]
                time.sleep(0.02)
            if while_held is not None:
                while_held()
        finally:
            RELEASE.set()
        for f in futures:
            f.result(30)
    return answers


def _stream(h, up, pieces: list[bytes], model: str) -> None:
    h.start_chunked(200, "text/event-stream")
    for i, piece in enumerate(pieces):
        if "-cut" in model and i == len(pieces) // 2:
            h._chunk(piece[: len(piece) // 2])
            return h.cut()
        if i and "-slow" in model:
            time.sleep(PACE)
        h._chunk(piece)
    h.end_chunked()
    up.sse_done.set()


def _json(h, status: int, body: bytes, model: str) -> None:
    if "-cut" in model:
        h.start_chunked(status, "application/json")
        h._chunk(body[: len(body) // 2])
        return h.cut()
    h._send(status, body)


def openai(h, seen):
    up = h.server.upstream
    req = json.loads(seen.body or b"{}")
    model = req.get("model", "")
    path = seen.path.split("?")[0]
    if "-error" in model:
        return h._send(429, B.openai_error_json())
    if path.endswith("/embeddings"):
        return _json(h, 200, B.openai_embeddings_json(model=model, n=len(req.get("input") or [1])), model)
    if path.endswith("/responses"):
        if req.get("stream"):
            return _stream(h, up, B.openai_responses_stream(model=model + "-2024"), model)
        return _json(h, 200, B.openai_responses_json(model=model + "-2024"), model)
    if path.endswith("/v1/completions"):
        body = json.loads(B.openai_chat_json(model=model + "-2024"))
        body.update(id="cmpl-1", object="text_completion", choices=[{"text": "Hello!", "index": 0, "logprobs": None, "finish_reason": "stop"}])
        return _json(h, 200, json.dumps(body).encode(), model)
    if req.get("stream"):
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        return _stream(h, up, B.openai_chat_stream(model=model + "-2024", usage=usage), model)
    content = "z" * 3_000_000 if "-big" in model else "Hello!"
    if "-wait" in model:
        time.sleep(0.5)
    if "-hold" in model:
        RELEASE.wait(20)
    cost = re.search(r"-cost(\d+)", model)
    prompt = int(cost.group(1)) if cost else 12
    return _json(h, 200, B.openai_chat_json(model=model + "-2024", content=content, prompt=prompt), model)


def anthropic(h, seen):
    up = h.server.upstream
    req = json.loads(seen.body or b"{}")
    model = req.get("model", "")
    if "-error" in model:
        return h._send(529, B.anthropic_error_json())
    if seen.path.startswith("/v1/complete"):  # the legacy Text Completions API: no usage reported
        base = {"type": "completion", "id": "compl_01", "model": model}
        if req.get("stream"):
            evs = [("completion", {**base, "completion": w, "stop_reason": None}) for w in (" Hel", "lo")]
            evs.append(("completion", {**base, "completion": "", "stop_reason": "stop_sequence"}))
            return _stream(h, up, [B.sse([e]) for e in evs], model)
        return _json(h, 200, json.dumps({**base, "completion": " Hello", "stop_reason": "stop_sequence"}).encode(), model)
    if req.get("stream"):
        return _stream(h, up, B.anthropic_message_stream(model=model + "-20241022"), model)
    return _json(h, 200, B.anthropic_message_json(model=model + "-20241022"), model)


def gemini(h, seen):
    up = h.server.upstream
    path, _, query = seen.path.partition("?")
    model = path.rsplit("/", 1)[-1].split(":")[0]
    if "-error" in model:
        return h._send(400, B.gemini_error_json())
    if path.endswith(":embedContent"):
        return h._send(200, B.gemini_embed_json())
    if path.endswith(":batchEmbedContents"):
        n = len(json.loads(seen.body or b"{}").get("requests") or [1])
        return h._send(200, json.dumps({"embeddings": [{"values": [0.1, 0.2]} for _ in range(n)]}).encode())
    if path.endswith(":streamGenerateContent"):
        if "alt=sse" in query:
            return _stream(h, up, B.gemini_sse(), model)
        h.start_chunked(200, "application/json")
        for piece in B.gemini_json_array_stream():
            h._chunk(piece)
        h.end_chunked()
        return
    return _json(h, 200, B.gemini_generate_json(), model)


def install(upstream) -> None:
    upstream.routes += [
        ("/v1/chat/completions", openai), ("/v1/responses", openai), ("/v1/embeddings", openai), ("/v1/completions", openai),
        ("/v1/messages", anthropic), ("/v1/complete", anthropic),
        ("/v1beta/models/", gemini), ("/v1/models/", gemini),
    ]
