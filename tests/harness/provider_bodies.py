"""Provider response bodies as the real APIs send them (shapes from their API references), shared by the
parser unit tests and the fake provider upstream. Each builder returns bytes on the wire."""

from __future__ import annotations

import json


def sse(events: list[tuple[str | None, object]], eol: str = "\n") -> bytes:
    out = []
    for name, data in events:
        lines = []
        if name:
            lines.append(f"event: {name}")
        payload = data if isinstance(data, str) else json.dumps(data)
        lines += [f"data: {line}" for line in payload.split("\n")]
        out.append(eol.join(lines) + eol + eol)
    return "".join(out).encode()


# ----------------------------------------------------------------------------------------------- OpenAI


def openai_chat_json(model="gpt-4o-mini-2024-07-18", content="Hello!", prompt=12, completion=5, cached=4, reasoning=2) -> bytes:
    return json.dumps({
        "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": reasoning}},
    }).encode()


def openai_chat_stream(model="gpt-4o-mini-2024-07-18", words=("Hel", "lo", "!"), usage=True, prompt=12, eol="\n") -> list[bytes]:
    """One element per event, as a server flushes them."""
    base = {"id": "chatcmpl-stream1", "object": "chat.completion.chunk", "created": 1, "model": model}
    evs = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], **({"usage": None} if usage else {})}]
    for w in words:
        evs.append({**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}], **({"usage": None} if usage else {})})
    evs.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], **({"usage": None} if usage else {})})
    if usage:
        evs.append({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words),
                                                   "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}})
    out = [sse([(None, e)], eol) for e in evs]
    out.append(sse([(None, "[DONE]")], eol))
    return out


def openai_responses_json(model="gpt-4o-2024-08-06") -> bytes:
    return json.dumps({
        "id": "resp_123", "object": "response", "status": "completed", "model": model,
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]}],
        "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 8,
                  "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 38},
    }).encode()


def openai_responses_stream(model="gpt-4o-2024-08-06") -> list[bytes]:
    resp = {"id": "resp_456", "object": "response", "status": "in_progress", "model": model, "usage": None}
    done = {**resp, "status": "completed", "usage": {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7,
                                                    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 28}}
    evs = [("response.created", {"type": "response.created", "sequence_number": 0, "response": resp}),
           ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi"}),
           ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 2, "delta": " there"}),
           ("response.completed", {"type": "response.completed", "sequence_number": 3, "response": done})]
    return [sse([e]) for e in evs]


def openai_embeddings_json(model="text-embedding-3-small", n=2) -> bytes:
    return json.dumps({"object": "list", "model": model,
                       "data": [{"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3]} for i in range(n)],
                       "usage": {"prompt_tokens": 9, "total_tokens": 9}}).encode()


def openai_error_json(code="rate_limit_exceeded") -> bytes:
    return json.dumps({"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": code}}).encode()


# ----------------------------------------------------------------------------------------------- Anthropic


def anthropic_message_json(model="claude-3-5-sonnet-20241022") -> bytes:
    return json.dumps({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30, "output_tokens": 6},
    }).encode()


def anthropic_message_stream(model="claude-3-5-sonnet-20241022", words=("Hel", "lo")) -> list[bytes]:
    evs = [("message_start", {"type": "message_start", "message": {
        "id": "msg_stream1", "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"})]
    for w in words:
        evs.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}))
    evs += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": {"output_tokens": 15}}),
            ("message_stop", {"type": "message_stop"})]
    return [sse([e]) for e in evs]


def anthropic_error_json(kind="overloaded_error") -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": "Overloaded"}}).encode()


# ----------------------------------------------------------------------------------------------- Gemini


def gemini_chunk(text: str, finish: str | None, prompt=8, cands=0, thoughts=None, model="gemini-2.0-flash-001") -> dict:
    cand = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": cands, "totalTokenCount": prompt + cands + (thoughts or 0)}
    if thoughts is not None:
        usage["thoughtsTokenCount"] = thoughts
    return {"candidates": [cand], "usageMetadata": usage, "modelVersion": model, "responseId": "resp-gem-1"}


def gemini_generate_json() -> bytes:
    c = gemini_chunk("Hello!", "STOP", prompt=11, cands=4, thoughts=7)
    c["usageMetadata"]["cachedContentTokenCount"] = 5
    return json.dumps(c).encode()


def gemini_stream_chunks() -> list[dict]:
    return [gemini_chunk("Hel", None, cands=1), gemini_chunk("lo", None, cands=2), gemini_chunk("!", "MAX_TOKENS", cands=3, thoughts=4)]


def gemini_sse(eol="\r\n") -> list[bytes]:
    return [sse([(None, c)], eol) for c in gemini_stream_chunks()]


def gemini_json_array_stream() -> list[bytes]:
    """:streamGenerateContent without alt=sse: one JSON array, flushed element by element."""
    chunks = gemini_stream_chunks()
    parts = [b"[" + json.dumps(chunks[0], indent=2).encode()]
    parts += [b",\r\n" + json.dumps(c, indent=2).encode() for c in chunks[1:]]
    parts.append(b"]")
    return parts


def gemini_embed_json() -> bytes:
    return json.dumps({"embedding": {"values": [0.1, 0.2, 0.3]}}).encode()


def gemini_error_json() -> bytes:
    return json.dumps({"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}).encode()
