"""How the gateway runs its steps: in order, each under its own error guard, as mitmproxy would run
top-level addons (`clrk.proxy.gateway.Gateway` for each hook; `EgressControl` for what follows an allow
decision). A step that raises is logged and the following steps still run."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger("clrk")

Step = Callable[[Any], Awaitable[None] | None]

def run_steps(hook: str, steps: Sequence[Step], arg: Any) -> Awaitable[None] | None:
    """Runs the steps in order, each under its own guard. Steps are plain functions; one that has to wait
    returns an awaitable, and the rest then run after it (mitmproxy awaits what a hook returns)."""
    for i, step in enumerate(steps):
        try:
            pending = step(arg)
        except Exception:
            failed(hook, step)
            continue
        if pending is not None:
            return _finish(hook, pending, step, steps[i + 1:], arg)
    return None


def run_steps_after(hook: str, step: Step, steps: Sequence[Step], arg: Any, pending: Awaitable[None] | None) -> Awaitable[None] | None:
    """`run_steps` of `steps`, after `step` (already run, under its own guard) returned `pending`."""
    if pending is not None:
        return _finish(hook, pending, step, steps, arg)
    return run_steps(hook, steps, arg)


async def _finish(hook: str, pending: Awaitable[None], step: Step, rest: Sequence[Step], arg: Any) -> None:
    try:
        await pending
    except Exception:
        failed(hook, step)
    for step in rest:
        try:
            pending = step(arg)
            if pending is not None:
                await pending
        except Exception:
            failed(hook, step)


def failed(hook: str, step: Step) -> None:
    owner = getattr(step, "__self__", None)
    name = type(owner).__name__ if owner is not None else getattr(step, "__qualname__", repr(step))
    log.error("clrk: %s.%s raised; the following steps still run", name, hook, exc_info=True)
