"""The protocol every provider implements, and the body plumbing they share.

A `ProviderParser` is one provider API's translator for one transaction. It answers three questions, each
as values it hands back, never by touching the request or response:

- which call is this, which model: `operation(path)` (from the path alone, to decide on headers), then the
  request body (`request_body`), which may name the model and what the budget estimate needs;
- what to change in the request: `request_changes(model, stream_usage)` returns a `RequestChanges` (a new
  path, top-level JSON members to set) for a Backend's model rewrite and for usage in a stream; the proxy
  applies them in one place (clrk/proxy/steps/routing.py), the body through `changed_body`, which splices
  the changed members in and leaves every other byte as the agent sent it;
- what the response carried: the response status and content type, then every decoded piece of the
  response body (the whole body, however long, in bounded memory), then the end. Out comes a
  `GenAiResult`: operation, models, ids, finish reasons, usage, provider error type.

`on_request(doc)` also reads what a token budget estimates the call by: max output tokens, how many generations
it asks for, input the provider adds by reference, and whether it is a job billed after the answer.

Providers implement `operation(path)`, `on_request(doc)`, `model_change(model)` and `stream_usage_change()`
where their API differs from the defaults (the model in a top-level `model` member, usage reported without
asking), `on_event(event, data)` for SSE, `on_json(doc)` for a whole JSON body, `on_error(doc)` for an error
body, and `on_truncated_json(tail)` for a JSON body too large to parse whole (usage is read from its tail). Everything runs on the proxy's event loop: O(piece), no blocking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from clrk import attributes as A
from clrk.providers import shallow
from clrk.providers.sse import SseParser

JSON_PARSE_LIMIT = 1024 * 1024  # a JSON body up to this size is parsed whole
TAIL_BYTES = 64 * 1024  # past that, the usage is read from the last TAIL_BYTES


_NONZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19  # 2**63 has 19 digits


def loads(data: bytes | bytearray | str) -> Any:
    """`json.loads`, through orjson where that gives the same answer: every provider call has its request
    and response bodies parsed on the proxy's one thread, and orjson does that several times faster.
    orjson reads an integer past 64 bits as a float where json keeps it exact, so a body with a run of 19
    or more digits anywhere goes to json; so does anything orjson refuses (NaN, UTF-16, a BOM, deep
    nesting, a lone surrogate). What parses, to what, and what raises which error is json's."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.translate(_NONZERO).find(_LONG_NUMBER) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


@dataclass(frozen=True, slots=True)
class RequestChanges:
    """What a provider asks to change in a request, as values: `path`, the new path (its query is left as
    the request has it by then: a key injected into it stays), when the model is named by the path;
    `members`, top-level members of the JSON body to set (new ones are added). Empty (false) when nothing
    is to change."""

    path: str | None = None
    members: Mapping[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.path is not None or bool(self.members)


NO_CHANGES = RequestChanges()


@dataclass(slots=True)
class GenAiResult:
    system: str
    provider_name: str
    operation: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    stream: bool = False
    usage_visible: bool = False
    error_type: str | None = None
    parse_error: str | None = None

    def attributes(self) -> dict[str, Any]:
        # Written out member by member (not a loop over (name, value) pairs): once per provider call, on the
        # proxy's thread, and the pairs alone were nine tuples built each time.
        out: dict[str, Any] = {
            A.GEN_AI_SYSTEM: self.system,
            A.GEN_AI_PROVIDER_NAME: self.provider_name,
            A.GEN_AI_RESPONSE_STREAM: self.stream,
            A.CLRK_BODY_USAGE_VISIBLE: self.usage_visible,
        }
        if self.operation is not None:
            out[A.GEN_AI_OPERATION_NAME] = self.operation
        if self.request_model is not None:
            out[A.GEN_AI_REQUEST_MODEL] = self.request_model
        if self.response_model is not None:
            out[A.GEN_AI_RESPONSE_MODEL] = self.response_model
        if self.response_id is not None:
            out[A.GEN_AI_RESPONSE_ID] = self.response_id
        if self.input_tokens is not None:
            out[A.GEN_AI_USAGE_INPUT_TOKENS] = self.input_tokens
        if self.output_tokens is not None:
            out[A.GEN_AI_USAGE_OUTPUT_TOKENS] = self.output_tokens
        if self.cache_read_tokens is not None:
            out[A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = self.cache_read_tokens
        if self.cache_creation_tokens is not None:
            out[A.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = self.cache_creation_tokens
        if self.reasoning_tokens is not None:
            out[A.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = self.reasoning_tokens
        if self.finish_reasons:
            out[A.GEN_AI_RESPONSE_FINISH_REASONS] = list(self.finish_reasons)
        return out


def as_int(v: Any) -> int | None:
    """An integer the record can carry (64-bit signed, as DuckDB, msgpack and OTLP store it), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 else None


_COUNT_TEXT = re.compile(r"[ \t\n\r]*[+-]?[0-9]{1,30}[ \t\n\r]*")  # JSON white space and ASCII digits: what int() reads


def object_after_key(text: str, key: str) -> Any:
    """The JSON value after the last `"key":` in `text` (a body's tail), or None."""
    for m in reversed(list(re.finditer('"' + re.escape(key) + r'"\s*:\s*', text))):
        try:
            value, _ = json.JSONDecoder().raw_decode(text, m.end())
            return value
        except (ValueError, RecursionError):  # a tail nested past json's depth is as unreadable as a cut one
            continue
    return None


class ProviderParser:
    """Base class: subclasses set the class attributes and override the `on_*` methods they need."""

    name: ClassVar[str]  # the registry key and Backend `schema.name`
    system: ClassVar[str]  # gen_ai.system (the seed's value)
    provider_name: ClassVar[str]  # gen_ai.provider.name (current semconv)
    hosts: ClassVar[tuple[str, ...]]  # public API hosts

    @classmethod
    def operation(cls, path: str) -> tuple[str, str | None] | None:
        """(gen_ai.operation.name, model named by the path) for an endpoint this provider serves, else None."""
        raise NotImplementedError

    # Per-transaction state that starts as one immutable value: a class default until first set on the
    # instance (a parser is made for every provider call, and each store in __init__ is paid by each call).
    status: int | None = None
    request_doc: dict | None = None  # the parsed request body, until the request has left
    # Where each top-level member sits in a large body (whose request_doc holds only the small members).
    request_spans: dict[str, tuple[int, int, int]] | None = None
    request_bytes = b""  # the (decoded) body request_doc and request_spans were read from
    request_size = 0
    max_output_tokens: int | None = None  # what the request caps each generation's output at, if it says
    choices = 1  # generations it asks for (n, best_of, candidateCount, prompts): the output multiplier
    server_context: str | None = None  # the field naming input the provider holds (previous_response_id...)
    max_input_tokens: int | None = None  # a cap the request puts on that held input, if it says
    unbudgetable: str | None = None  # why no budget can hold this call (a job billed after the answer)
    invalid: str | None = None  # a field the budget estimate needs that is no count the gateway can read
    _sse: SseParser | None = None
    # The JSON body so far: the first piece as it came when it is bytes (a buffered response is one piece: no
    # copy), a bytearray once a second piece is added (never grown in place while it is the class's b"").
    _body: bytes | bytearray = b""
    _body_size = 0
    _tail = b""
    _done = False

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str):
        self.result = GenAiResult(self.system, self.provider_name, operation, path_model)  # (positional: binds faster)
        self.path = path  # the request target's path, without its query
        self.query = query  # what follows its "?"

    # ------------------------------------------------------------------ request

    def request_body(self, body: bytes) -> None:
        self.request_size = len(body)
        self.request_bytes = body
        if not body or len(body) > 32 * JSON_PARSE_LIMIT:
            return
        try:
            if len(body) > JSON_PARSE_LIMIT:
                # Large: only the top-level members are found, the small ones parsed (memory stays near the
                # body's own, not a multiple of it); the large ones (messages...) stand as Elided.
                spans = shallow.members(body)
                if spans is None:
                    raise ValueError("not one JSON object the gateway can read within its bounds")
                self.request_spans = spans
                doc = shallow.shallow_doc(body, spans, loads)
            else:
                doc = loads(body)
            if isinstance(doc, dict):
                self.request_doc = doc
                self.on_request(doc)
        except Exception as e:  # not JSON, nested past the recursion limit, wrong types: noted, never raised
            self.request_doc = None
            self.result.parse_error = f"request body not understood: {type(e).__name__}: {str(e)[:200]}"

    def on_request(self, doc: dict) -> None:
        pass

    def count(self, doc: dict, key: str, zero_unset: bool = False) -> int | None:
        """`doc[key]` as a provider reads a token or choice count at its most lenient (an integer, a float with
        no fraction, a decimal string): None when absent or null, or 0 where 0 means unset (proto3). Anything
        else, not a positive count, marks the request `invalid`: its cost cannot be estimated."""
        v = doc.get(key)
        if v is None:
            return None
        n: int | None = None
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        elif isinstance(v, float) and v.is_integer():  # False for inf and nan
            n = int(v)
        elif isinstance(v, str) and _COUNT_TEXT.fullmatch(v):
            n = int(v)
        if n == 0 and zero_unset:
            return None
        if n is not None and n >= 2**63:
            n = 2**63 - 1  # far past any provider's limit already; keeps the estimate's arithmetic and text small
        if n is None or n <= 0:
            if isinstance(v, str):
                shown = repr(v[:40])
            else:
                shown = json.dumps(v)[:40] if isinstance(v, (int, float)) else type(v).__name__
            self.invalid = f"{key} must be a positive integer, not {shown}"
            return None
        return n

    def largest_count(self, doc: dict, keys: tuple[str, ...], zero_unset: bool = False) -> int | None:
        """The largest of the counts `keys` name (the provider may honour any of them), or None."""
        found = [n for k in keys if (n := self.count(doc, k, zero_unset)) is not None]
        return max(found) if found else None

    # ------------------------------------------------------------------ request changes

    def request_changes(self, model: str | None = None, stream_usage: bool = False) -> RequestChanges:
        """What to change so that this request asks the upstream for `model` (None: the model it names) and,
        with `stream_usage`, reports its usage if it streams: values read from the request as parsed, which
        stays as it is. `NO_CHANGES` when nothing is to change."""
        if model is None:  # most calls: no rewrite, so at most the stream's usage to switch on
            usage = self.stream_usage_change() if stream_usage else None
            return RequestChanges(None, {**usage}) if usage else NO_CHANGES
        path, members = self.model_change(model)
        if stream_usage:
            usage = self.stream_usage_change()
            if usage:
                members = {**members, **usage}
        return RequestChanges(path, members) if path is not None or members else NO_CHANGES

    def model_change(self, model: str) -> tuple[str | None, dict[str, Any]]:
        """(new path without its query, or None; members to set) naming `model` instead of the request's: by
        default the body's
        top-level `model` member, where the body has one."""
        doc = self.request_doc
        return None, ({"model": model} if doc is not None and "model" in doc else {})

    def stream_usage_change(self) -> dict[str, Any]:
        """The members that ask a streaming request for usage in its stream, where the API needs asking."""
        return {}

    def request_sent(self) -> None:
        """The request has been read and changed as needed: what was kept of its body is let go."""
        self.request_doc, self.request_spans, self.request_bytes = None, None, b""

    def changed_body(self, members: Mapping[str, Any]) -> bytes:
        """The request body with `members` set: only they are encoded, every other byte is the agent's (the
        body as decoded, if the agent compressed it). Needs the body still held (until the request leaves)."""
        body = self.request_bytes
        spans = self.request_spans or shallow.members(body)
        if spans is not None:
            return shallow.splice(body, spans, members)
        # Parsed whole by json but past what the member walk reads within its bounds: written out again.
        assert self.request_doc is not None
        return json.dumps({**self.request_doc, **members}, separators=(",", ":"), ensure_ascii=False).encode()

    # ------------------------------------------------------------------ response

    def response_headers(self, status: int, content_type: str | None) -> None:
        self.status = status
        if content_type and content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
            self._sse = SseParser()
            self.result.stream = True

    def feed(self, data: bytes) -> None:
        """A decoded piece of the response body."""
        try:
            if self._sse is not None:
                for event, payload in self._sse.feed(data):
                    self._event(event, payload)
                return
            self._body_size += len(data)
            if self._body_size <= JSON_PARSE_LIMIT:
                body = self._body
                if type(body) is bytearray:
                    body += data
                elif not body and type(data) is bytes:
                    self._body = data  # immutable: kept as it is
                else:  # a second piece (or a first that is no bytes: a buffer its owner may reuse)
                    grown = bytearray(body)
                    grown += data
                    self._body = grown
            else:
                if self._body:  # crossed the limit: from now on only the tail is kept
                    self._tail = bytes(self._body[-TAIL_BYTES:])
                    self._body = b""
                self._tail = (self._tail + data)[-TAIL_BYTES:]
        except Exception as e:  # a parser bug or hostile input must never break the flow
            self._fail(e)

    def _event(self, event: str, payload: str) -> None:
        try:
            self.on_event(event, payload)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            self.result.parse_error = f"unreadable {event or 'message'} event: {e}"

    def end(self) -> GenAiResult:
        """Called once the response is over (complete or not); returns the result."""
        if self._done:
            return self.result
        self._done = True
        if self._sse is not None:
            return self.result
        try:
            if self._body_size > JSON_PARSE_LIMIT:
                self.on_truncated_json(self._tail.decode("utf-8", "replace"))
            elif self._body:
                try:
                    doc = loads(self._body)
                except ValueError as e:
                    self.result.parse_error = f"response body is not complete JSON: {e}"
                    # A body cut mid-way: what it said so far may still name the usage.
                    self.on_truncated_json(bytes(self._body[-TAIL_BYTES:]).decode("utf-8", "replace"))
                else:
                    if self.status is not None and self.status >= 400:
                        self.on_error(doc)
                    else:
                        self.on_json(doc)
        except Exception as e:
            self._fail(e)
        self._body = b""
        return self.result

    def _fail(self, e: Exception) -> None:
        self.result.parse_error = f"{type(e).__name__}: {e}"
        self._sse = None
        self._body = b""
        self._body_size = 0

    # ------------------------------------------------------------------ provider hooks

    def on_event(self, event: str, data: str) -> None:
        pass

    def on_json(self, doc: Any) -> None:
        pass

    def on_error(self, doc: Any) -> None:
        pass

    def on_truncated_json(self, tail: str) -> None:
        pass
