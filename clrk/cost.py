"""What a model call costs in US dollars: prices from genai-prices' bundled data, overridden or extended by
ModelPricing policy documents, applied to the usage the provider reported.

Every record's `gen_ai.usage.cost` and every dollar budget charge come from `PriceBook.cost_of` (one
function, so the record and the budget always agree). The price data is the one genai-prices ships in its
package, pinned by clrk: the gateway never fetches prices at run time (genai-prices can update itself from
the network, but only through `UpdatePrices`, which clrk never starts; and prices are read from the bundled
`genai_prices.data`, never from the snapshot such an update would replace).

Cost on the proxy's thread: a model seen before is a dict hit (per (provider, model), bounded) and five
multiplications (≈ 1 µs); ordinary traffic never comes here. The first lookup of a model scans its
provider's price list (≈ 100 models: tens of µs). The data of all ≈ 45 providers would cost ≈ 25 MB in the
gateway process, so a child interpreter reads it once and hands back the three providers clrk prices
(≈ 3 MB here; ≈ 0.5 s of the child's CPU); the gateway does that off the event loop at start (`preload`)
when its policy may allow model calls, and otherwise on the first model call whose usage it sees.

Usage is read as clrk records it (OpenTelemetry's rules): input tokens include cache reads and cache writes,
output tokens include reasoning tokens. Input not read from or written to a cache is billed at the input
price, cache reads at the cached-input price, cache writes at the cache-write price (5-minute writes, the
default), reasoning at the reasoning price where the model has one, else at the output price. Prices tiered
by the call's input size (Anthropic's and Gemini's long-context prices) take the tier the input falls in; prices
that changed on a date take the one in force when the call started. Not priced: per-request service tiers
(OpenAI flex/priority, batch discounts), audio and image token rates apart from text, web search and other
per-call tools — a call using them is priced as standard text tokens.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clrk import attributes as A

log = logging.getLogger("clrk")

POLICY = "policy"  # clrk.cost.source of a price from a ModelPricing document
UNKNOWN = "unknown"  # clrk.cost.source when the model has no known price: the record carries no cost
PER_MTOK = 1_000_000
CACHE_SIZE = 4096  # (provider, model) lookups kept: models come from requests and responses, so bounded
MAX_MODEL_LENGTH = 256  # a longer "model" is no model id (real ones are under 100 characters): never looked up

# clrk's gen_ai.system -> genai-prices' provider id
PROVIDER_IDS: Mapping[str, str] = {"openai": "openai", "anthropic": "anthropic", "google_genai": "google"}

# Per-token prices: a flat price, or (base, ((input threshold, price), ...)) where the highest threshold the
# call's input passes sets the price of all of its tokens of that kind.
Rate = float | tuple[float, tuple[tuple[int, float], ...]]


def _rate_at(rate: Rate, total_input: int) -> float:
    if isinstance(rate, float):
        return rate
    base, tiers = rate
    for start, price in reversed(tiers):
        if total_input > start:
            return price
    return base


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's prices in USD per token, and where they come from (`clrk.cost.source`)."""

    input: Rate
    output: Rate
    cache_read: Rate
    cache_write: Rate
    reasoning: Rate
    source: str
    max_rate: float  # the highest price of any token kind: what a dollar budget reserves output at
    flat: bool = field(init=False, repr=False, compare=False)  # no rate tiered by input size (worked out once)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flat", all(type(r) is float for r in (
            self.input, self.output, self.cache_read, self.cache_write, self.reasoning)))

    def highest_rate(self, input_tokens: int) -> float:
        """USD per token of the dearest kind of token for a call of this input size: what a dollar budget
        reserves a call's estimate at (the output price, for every listed model)."""
        n = input_tokens
        return max(_rate_at(self.input, n), _rate_at(self.output, n), _rate_at(self.cache_read, n),
                   _rate_at(self.cache_write, n), _rate_at(self.reasoning, n))

    def cost(self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0,
             reasoning: int = 0) -> float:
        """USD for this usage (counts as clrk records them: input includes the cache, output the reasoning)."""
        uncached = input_tokens - cache_read - cache_write
        if uncached < 0:
            uncached = 0
        visible = output_tokens - reasoning
        if visible < 0:
            visible = 0
        if self.flat:
            usd = (uncached * self.input + cache_read * self.cache_read + cache_write * self.cache_write
                   + visible * self.output + reasoning * self.reasoning)
        else:
            n = input_tokens
            usd = (uncached * _rate_at(self.input, n) + cache_read * _rate_at(self.cache_read, n)
                   + cache_write * _rate_at(self.cache_write, n) + visible * _rate_at(self.output, n)
                   + reasoning * _rate_at(self.reasoning, n))
        return round(usd, 12)


def _max_rate(*rates: Rate) -> float:
    out = 0.0
    for r in rates:
        if isinstance(r, float):
            out = max(out, r)
        else:
            out = max(out, r[0], *(p for _, p in r[1]))
    return out


def flat_price(source: str, input_per_mtok: float, output_per_mtok: float, cached_input_per_mtok: float | None = None,
               cache_write_per_mtok: float | None = None, reasoning_per_mtok: float | None = None) -> ModelPrice:
    """A price from per-million-token figures (a ModelPricing entry): cache reads and writes default to the
    input price, reasoning to the output price, as a provider without separate prices bills them."""
    i, o = input_per_mtok / PER_MTOK, output_per_mtok / PER_MTOK
    cr = i if cached_input_per_mtok is None else cached_input_per_mtok / PER_MTOK
    cw = i if cache_write_per_mtok is None else cache_write_per_mtok / PER_MTOK
    r = o if reasoning_per_mtok is None else reasoning_per_mtok / PER_MTOK
    return ModelPrice(i, o, cr, cw, r, source, _max_rate(i, o, cr, cw, r))


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """One ModelPricing entry: a provider (or `*`) and a model glob, and the price of the models it matches."""

    provider: str
    model: str  # glob, matched case-insensitively as providers treat model ids
    price: ModelPrice

    def matches(self, provider: str, model: str) -> bool:
        return (self.provider == "*" or self.provider == provider) and fnmatch.fnmatchcase(model, self.model)


# --------------------------------------------------------------------------- the bundled library


_library_lock = threading.Lock()
_library: tuple[str, dict[str, Any]] | None = None  # (source, {provider id: genai_prices Provider})


def library_source() -> str:
    """`clrk.cost.source` of a bundled price: the genai-prices version the prices come from."""
    return _load()[0]


# Run in a child interpreter: reads the bundled data (never the auto-updated snapshot), with every connection
# refused, and hands back the providers clrk prices (with those they fall back to) as a pickle. The whole data
# costs ≈ 25 MB in the process that imports it, and Python does not give that back when most is dropped; the
# three providers clrk needs cost ≈ 3 MB.
_EXTRACT = """
import pickle, socket, sys
def _refused(*a, **k):
    raise OSError("clrk: genai-prices may not use the network")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = _refused
from importlib.metadata import version
from genai_prices import data
wanted = set(sys.argv[1:])
wanted |= {f for p in data.providers if p.id in wanted for f in (p.fallback_model_providers or ())}
sys.stdout.buffer.write(pickle.dumps((version("genai-prices"), [p for p in data.providers if p.id in wanted]), 5))
"""


def _extract() -> tuple[str, list[Any]]:
    import pickle
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _EXTRACT, *sorted(set(PROVIDER_IDS.values()))],
                         capture_output=True, timeout=120, check=True).stdout
    import genai_prices.types  # noqa: F401 - the classes the pickle names

    version, providers = pickle.loads(out)  # noqa: S301 - our own child's answer on a pipe
    return version, providers


def _load() -> tuple[str, dict[str, Any]]:
    global _library
    if _library is None:
        with _library_lock:
            if _library is None:
                try:
                    version, providers = _extract()
                except Exception as e:  # no child process here: the data in this process (≈ 25 MB)
                    log.warning("clrk: reading prices in a child process failed (%s); reading them here", e)
                    from importlib.metadata import version as _version

                    from genai_prices import data  # the bundled snapshot: never the auto-updated one

                    version = _version("genai-prices")
                    wanted = set(PROVIDER_IDS.values())
                    providers = [p for p in data.providers if p.id in wanted or any(
                        p.id in (q.fallback_model_providers or ()) for q in data.providers if q.id in wanted)]
                _library = (f"genai-prices {version}", {p.id: p for p in providers})
    return _library


_preload: threading.Thread | None = None


def preload() -> threading.Thread:
    """Loads the price data in a thread (once), so the proxy's event loop does not pay for it on a first call."""
    global _preload
    with _library_lock:
        if _preload is None:
            _preload = threading.Thread(target=_load, name="clrk-prices", daemon=True)
            _preload.start()
        return _preload


def _rate(value: Any) -> Rate | None:
    """A genai-prices price (Decimal USD per million, or TieredPrices) as USD per token."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is not None:
        return (float(value.base) / PER_MTOK, tuple((int(t.start), float(t.price) / PER_MTOK) for t in tiers))
    return float(value) / PER_MTOK


@dataclass(frozen=True, slots=True)
class _Resolved:
    price: ModelPrice | None
    until: float  # epoch seconds when the price may change (a dated price, an off-peak hour): look up again


def _library_price(provider: str, model: str, when: float) -> _Resolved:
    source, providers = _load()
    prov = providers.get(PROVIDER_IDS.get(provider, provider))
    if prov is None:
        return _Resolved(None, math.inf)
    info = prov.find_model(model, all_providers=list(providers.values()) if prov.fallback_model_providers else None)
    if info is None:
        return _Resolved(None, math.inf)
    ts = datetime.fromtimestamp(when, UTC)
    mp = info.get_prices(ts)
    until = math.inf
    if not hasattr(info.prices, "calc_price"):  # a list of conditional prices: by date or time of day
        for cp in info.prices:
            c = cp.constraint
            if c is None:
                continue
            start = getattr(c, "start_date", None)
            if start is None:  # a time-of-day price: valid for this call only
                until = when
                break
            start_ts = (datetime.combine(start, datetime.min.time(), UTC) if not isinstance(start, datetime)
                        else start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()
            if start_ts > when:
                until = min(until, start_ts)
    i, o = _rate(mp.input_mtok), _rate(mp.output_mtok)
    if i is None and o is None:
        if any(v is not None for v in vars(mp).values()):
            return _Resolved(None, until)  # priced per request, per character, per second...: not by tokens
        i = o = 0.0  # listed with no price at all: free (OpenAI's moderation, Gemma on Gemini's API)
    i = 0.0 if i is None else i
    o = 0.0 if o is None else o
    cr = _rate(mp.cache_read_mtok)
    cw = _rate(mp.cache_write_mtok)
    r = _rate(mp.output_reasoning_mtok)
    cr, cw, r = (i if cr is None else cr), (i if cw is None else cw), (o if r is None else r)
    return _Resolved(ModelPrice(i, o, cr, cw, r, source, _max_rate(i, o, cr, cw, r)), until)


# --------------------------------------------------------------------------- the price book


class PriceBook:
    """The prices one policy gives: its ModelPricing overrides (first match wins), then the bundled data."""

    def __init__(self, overrides: Sequence[PriceOverride] = ()):
        self.overrides = tuple(overrides)
        self._cache: dict[tuple[str, str], _Resolved] = {}

    def price(self, provider: str, model: str | None, when: float | None = None) -> ModelPrice | None:
        """The price of `model` served by `provider` (clrk's gen_ai.system) at `when` (epoch seconds), or None."""
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_LENGTH or not isinstance(provider, str):
            return None  # what a request or response names is data: no model id is a list, or a megabyte long
        key = (provider, model)
        hit = self._cache.get(key)
        if when is None:
            when = time.time()
        if hit is not None and when < hit.until:
            return hit.price
        resolved = self._resolve(provider, model, when)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = resolved
        return resolved.price

    def _resolve(self, provider: str, model: str, when: float) -> _Resolved:
        lowered = model.lower()
        for o in self.overrides:
            if o.matches(provider, lowered):
                return _Resolved(o.price, math.inf)
        return _library_price(provider, model, when)

    def price_of_call(self, provider: str, response_model: str | None, request_model: str | None,
                      when: float | None = None) -> ModelPrice | None:
        """The price of the model that answered; if that id is not listed but extends the one asked for (a
        dated snapshot newer than the price data, `gpt-4o-2025-..` for `gpt-4o`), the price of the one asked
        for. A different model that answered (a Backend's rewrite) is never priced as the one asked for."""
        price = self.price(provider, response_model or request_model, when)
        if (price is None and isinstance(response_model, str) and isinstance(request_model, str) and request_model
                and response_model != request_model and response_model.startswith(request_model)):
            price = self.price(provider, request_model, when)
        return price

    def cost_of(self, provider: str, model: str | None, input_tokens: int | None, output_tokens: int | None,
                cache_read: int | None = None, cache_write: int | None = None, reasoning: int | None = None,
                when: float | None = None, request_model: str | None = None) -> tuple[float | None, str]:
        """(USD, clrk.cost.source) of a call's usage by `model` (the one that answered; `request_model`, the
        one asked for, as `price_of_call` says); (None, "unknown") when the model has no known price."""
        # Every priced call comes here: a price this book has looked up, still in force, is used without the
        # checks `price` makes (its key passed them when it was stored) and without `_count`'s calls.
        name = model or request_model
        if type(name) is str and type(provider) is str:
            hit = self._cache.get((provider, name))
            if hit is not None and hit.price is not None and (time.time() if when is None else when) < hit.until:
                return hit.price.cost(
                    input_tokens if type(input_tokens) is int and input_tokens > 0 else 0,
                    output_tokens if type(output_tokens) is int and output_tokens > 0 else 0,
                    cache_read if type(cache_read) is int and cache_read > 0 else 0,
                    cache_write if type(cache_write) is int and cache_write > 0 else 0,
                    reasoning if type(reasoning) is int and reasoning > 0 else 0), hit.price.source
        price = self.price_of_call(provider, model, request_model, when)
        if price is None:
            return None, UNKNOWN
        return price.cost(_count(input_tokens), _count(output_tokens), _count(cache_read), _count(cache_write),
                          _count(reasoning)), price.source

    def cost_of_attributes(self, attrs: Mapping[str, Any], when: float | None = None) -> tuple[float | None, str]:
        """`cost_of` for a record's gen_ai.* attributes: the model that answered, else the one asked for."""
        return self.cost_of(attrs.get(A.GEN_AI_SYSTEM) or "", attrs.get(A.GEN_AI_RESPONSE_MODEL),
                            attrs.get(A.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(A.GEN_AI_USAGE_OUTPUT_TOKENS),
                            attrs.get(A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS),
                            attrs.get(A.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS),
                            attrs.get(A.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS), when, attrs.get(A.GEN_AI_REQUEST_MODEL))


def _count(v: Any) -> int:
    return v if type(v) is int and v > 0 else 0


BUNDLED = PriceBook()  # the bundled prices alone, for callers without a policy


def cost_of(provider: str, model: str | None, input_tokens: int | None, output_tokens: int | None,
            cache_read: int | None = None, cache_write: int | None = None, reasoning: int | None = None, *,
            when: float | None = None, request_model: str | None = None,
            book: PriceBook | None = None) -> tuple[float | None, str]:
    """(USD | None, clrk.cost.source) of a model call's usage (`model`: the one that answered): `book` (a
    policy's prices, `CompiledPolicy.pricing`) or the bundled prices alone."""
    return (book or BUNDLED).cost_of(provider, model, input_tokens, output_tokens, cache_read, cache_write,
                                     reasoning, when, request_model)


def format_usd(v: float | None) -> str:
    """Dollars for a person to read: cents from a dollar up, else down to a millionth of a cent (one call of a
    small model costs a few millionths of a dollar)."""
    if v is None:
        return "-"
    if v >= 1:
        return f"${v:,.2f}"
    text = f"{v:.8f}".rstrip("0")
    return "$" + (text if len(text.split(".")[1]) >= 2 else f"{v:.2f}")
