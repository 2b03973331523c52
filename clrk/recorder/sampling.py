"""Which finished transactions have their span and log record exported (`spec.otlp.sampling`).

Tail sampling: decided in the recorder on the whole record, so it can keep what head sampling cannot know at
the start — a denial, an error, a budget refusal. Everything else is kept by a deterministic function of the
trace id, the one OTel's TraceIdRatioBased sampler uses (the low 64 bits of the trace id below
ratio × 2^64), so every gateway, every recorder and every restart keep or drop a trace id alike, and a share
`r` kept is a subset of any share above `r`.

Traces stay whole as far as the recorder can see them: a trace id kept by a rule (a denial in an agent's run)
keeps the ordinary records of that trace in the same batch and in later ones (remembered for the last
`REMEMBERED_TRACES` such traces). Records of that trace exported earlier, in a batch already gone, were
decided by the ratio alone.

The store keeps every record either way, with the decision in `clrk.export.sampled`; metrics count every
transaction.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from collections.abc import Mapping

from clrk import attributes as A

REMEMBERED_TRACES = 65536
_LOW64 = (1 << 64) - 1
CLASSES = ("denied", "error", "budget")


def ratio_bound(ratio: float) -> int:
    """The bound TraceIdRatioBased compares the low 64 bits of a trace id with."""
    return round(ratio * (1 << 64))


def trace_kept(trace_id: str, bound: int) -> bool:
    """Whether the ratio keeps this trace id (hex): the same answer everywhere, every time."""
    try:
        return int(trace_id, 16) & _LOW64 < bound
    except (TypeError, ValueError):
        return bound > 0


def _globs(patterns) -> re.Pattern | None:
    pats = [p for p in patterns or () if p]
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)) if pats else None


class Sampler:
    """The sampling of one EgressGateway, from its `spec.otlp.sampling` (as plain data: snake_case keys)."""

    def __init__(self, cfg: Mapping | None = None):
        cfg = cfg or {}
        self.ratio = float(cfg.get("ratio", 1.0))
        self.bound = ratio_bound(self.ratio)
        keep = cfg.get("always_keep")
        self.keep = frozenset(CLASSES if keep is None else keep)
        self.keep_agents = _globs(cfg.get("keep_agents"))
        self.keep_rules = _globs(cfg.get("keep_rules"))
        self.parent_based = bool(cfg.get("parent_based", False))
        self.keeps_all = self.bound >= (1 << 64) and not self.parent_based
        self.forced: OrderedDict[str, None] = OrderedDict()  # trace ids a rule kept: the rest of them follow

    def config(self) -> tuple:
        return (self.ratio, self.keep, getattr(self.keep_agents, "pattern", None),
                getattr(self.keep_rules, "pattern", None), self.parent_based)

    def must_keep(self, row: Mapping) -> bool:
        """A record a rule keeps whatever the ratio: a denial, an error, a budget refusal (as configured), or an
        agent or decision rule named in keepAgents / keepRules."""
        keep = self.keep
        if keep:
            budget = row.get(A.CLRK_BUDGET_DENIED) is True
            if budget and "budget" in keep:
                return True
            if row.get(A.CLRK_DECISION) == "deny" and not budget and "denied" in keep:
                return True
            if "error" in keep and row.get(A.ERROR_TYPE) is not None and row.get(A.CLRK_DECISION) != "deny":
                return True
        if self.keep_agents is not None and row.get(A.AGENT_NAME) is not None:
            if self.keep_agents.match(f"{row.get(A.AGENT_NAMESPACE)}/{row[A.AGENT_NAME]}"):
                return True
        rule = row.get(A.CLRK_DECISION_RULE)
        if self.keep_rules is not None and rule:
            if self.keep_rules.match(rule) or self.keep_rules.match(rule.split("#", 1)[0]):
                return True
        return False

    def _parent_sampled(self, row: Mapping) -> bool | None:
        """The sampled flag of the agent's traceparent (the stored request header keeps its flags), or None."""
        if not row.get(A.PARENT_SPAN_ID):
            return None
        tp = (row.get(A.REQUEST_HEADERS) or {}).get("traceparent")
        if not isinstance(tp, str) or len(tp) < 55:
            return None
        try:
            return bool(int(tp[53:55], 16) & 1)
        except ValueError:
            return None

    def decide(self, rows: list[dict]) -> int:
        """Sets `clrk.export.sampled` on each row of this gateway; returns how many are kept."""
        if self.keeps_all:
            for row in rows:
                row[A.CLRK_EXPORT_SAMPLED] = True
            return len(rows)
        forced = self.forced
        ruled = [self.must_keep(row) for row in rows]
        for row, r in zip(rows, ruled, strict=True):
            if r:
                tid = row.get(A.TRACE_ID)
                forced[tid] = None
                forced.move_to_end(tid)
        while len(forced) > REMEMBERED_TRACES:
            forced.popitem(last=False)
        kept = 0
        for row, r in zip(rows, ruled, strict=True):
            tid = row.get(A.TRACE_ID)
            if r or tid in forced:
                keep = True
            else:
                parent = self._parent_sampled(row) if self.parent_based else None
                keep = parent if parent is not None else trace_kept(tid, self.bound)
            row[A.CLRK_EXPORT_SAMPLED] = keep
            kept += keep
        return kept
