"""Set-up every test module shares: a fresh invocation id, a bounded wait on a real condition, and a compiled
policy straight from document dicts (no files, no environment)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping

from pydantic import TypeAdapter

from clrk.policy.compiled import CompiledPolicy, compile_documents
from clrk.policy.loader import SourcedDocument
from clrk.policy.models import Document

_DOCUMENT = TypeAdapter(Document)


def new_invocation(prefix: str = "inv") -> str:
    """A `clrk-invocation-id` no other test uses: the key that finds this test's records."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_for[T](condition: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Polls `condition` until it returns something truthy, and returns that; fails saying `what` never
    happened once `timeout` seconds have passed. For waiting on an event, never on an amount of time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def compile_policy(*docs: dict, env: Mapping[str, str] | None = None) -> CompiledPolicy:
    """The policy these documents compile to, as if read from one file in this order. Secrets resolve from
    `env` only (never the test process's environment)."""
    sourced = [SourcedDocument(_DOCUMENT.validate_python(d), "mem.yaml", i + 1) for i, d in enumerate(docs)]
    return compile_documents(sourced, dict(env or {}))


def clrk_message(body: dict) -> str:
    """The `clrk: ...` text of a gateway answer, in clrk's own shape or a provider's (docs/POLICY.md, Errors)."""
    error = body["error"]
    return error if isinstance(error, str) else error["message"]
