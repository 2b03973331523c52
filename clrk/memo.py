"""A bounded memory of a pure function's results, for values the request path works out again and again
from the same few inputs (header names, paths): the caller looks up its dict inline (`store.get(key)`, the
cheap hit) and, on a miss, computes and hands the result to `remember`.

Bounded two ways, because the inputs come from agents: a key longer than `longest` is never kept (a header
name or path can be up to a whole request head long), and past `limit` entries the memory starts over — a
flood of distinct inputs costs what it did without the memory, and holds at most `limit` short keys.
"""

from __future__ import annotations

LIMIT = 4096
LONGEST = 512


def remember[V](store: dict, key: object, size: int, value: V, limit: int = LIMIT, longest: int = LONGEST) -> V:
    """Keeps `value` under `key` (whose length, as the caller measures it, is `size`) unless the key is too
    long; returns `value`."""
    if size <= longest:
        if len(store) >= limit:
            store.clear()
        store[key] = value
    return value
