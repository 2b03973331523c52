"""Hands a batch of one histogram's observations, grouped per attribute set, to the OTel SDK in one step.

`Histogram.record` costs ~8 µs a call in the SDK (a Measurement, its attributes cleaned and hashed, then the
aggregation of every reader). `GatewayMetrics` groups a batch's observations per (histogram, attribute set)
instead and `HistogramFeed.add` merges each group into the aggregation every reader already holds for that
set: the same bucket counts, sum (added value by value, in order, as the SDK would), min and max, so what the
readers export is unchanged and their export, temporality and start times stay the SDK's own.

This needs SDK internals (1.45: the measurement consumer's reader storages, `_ViewInstrumentMatch`, the
explicit-bucket aggregation's fields); they are named here only, and tests/test_metrics.py fails loudly when an
SDK upgrade moves them. Anything this does not know (another aggregation a View chose, exemplars sampled) goes
through the SDK's own `aggregate`, value by value.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from functools import reduce
from operator import add
from time import time_ns

from opentelemetry.context import get_current
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics._internal.measurement import Measurement

# Attribute sets whose aggregations are remembered; beyond, they are looked up per batch (the SDK caps the
# sets at 2000 per instrument; further ones share its overflow point, and a hostile stream of model names must
# not grow this memory either).
MAX_CACHED = 4096


class HistogramFeed:
    """The aggregations of one SDK histogram in every reader, fed whole groups of observations."""

    def __init__(self, instrument):
        self.instrument = instrument
        self.bounds = tuple(instrument._advisory.explicit_bucket_boundaries)
        self._consumer = instrument._measurement_consumer
        self._storages = None
        self._seen = False
        # attribute key (ours) -> [(aggregation, view match)] of every reader; only while no reader resets its
        # aggregations on collection (delta temporality), which would make them stale.
        self._cache: dict[tuple, list] = {}

    def seen(self) -> None:
        """The histogram takes its first observation: every reader lists it now, where the SDK's own path would
        have, so the order of the metrics in an export is unchanged too."""
        if not self._seen and self.instrument._is_enabled():
            self._seen = True
            for storage in self._consumer._reader_storages.values():
                storage._get_or_init_view_instrument_match(self.instrument)

    def add(self, key: tuple, attrs: dict, values: list) -> None:
        """Aggregates `values` (plain finite non-negative ints/floats, in arrival order) under `attrs` in every
        reader, as `instrument.record(v, attrs)` for each would have. `key` identifies `attrs` among this
        feed's groups (equal keys, equal attributes)."""
        if not values or not self.instrument._is_enabled():
            return
        bounds = self.bounds
        counts = [0] * (len(bounds) + 1)
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        batch = (counts, values, min(values), max(values))
        storages = self._consumer._reader_storages
        if storages is not self._storages:  # a reader added or removed: look everything up again
            self._storages, self._cache = storages, {}
        aggregations = self._cache.get(key)
        if aggregations is not None:
            for aggregation in aggregations:
                self._aggregate(aggregation, attrs, batch)
            return
        aggregations, keep = [], True
        for storage in storages.values():
            for match in storage._get_or_init_view_instrument_match(self.instrument):
                attributes = dict(attrs)
                if match._view._attribute_keys is not None:
                    attributes = {k: v for k, v in attributes.items() if k in match._view._attribute_keys}
                aggr_key = _hash_attributes(attributes)
                with match._lock:
                    aggregation = match._get_or_create_aggregation(aggr_key, attributes)
                    if match._reset_on_collect:  # its collection discards aggregations: merge before it can
                        keep = False
                        self._aggregate(aggregation, attrs, batch)
                        continue
                aggregations.append(aggregation)
                self._aggregate(aggregation, attrs, batch)
        if keep and len(self._cache) < MAX_CACHED:
            self._cache[key] = aggregations

    def _aggregate(self, aggregation, attrs: dict, batch: tuple) -> None:
        counts, values, low, high = batch
        sampler = self._consumer._sdk_config.exemplar_filter
        if (type(aggregation) is not _ExplicitBucketHistogramAggregation or aggregation._boundaries != self.bounds
                or not isinstance(sampler, AlwaysOffExemplarFilter)):
            for v in values:  # what this adapter does not know: the SDK's own way, value by value
                m = Measurement(v, time_ns(), self.instrument, get_current(), attrs)
                aggregation.aggregate(m, sampler.should_sample(v, m.time_unix_nano, m.attributes, m.context))
            return
        with aggregation._lock:
            if aggregation._value is None:
                aggregation._value = [0] * len(counts)
            value = aggregation._value
            for i, n in enumerate(counts):
                if n:
                    value[i] += n
            # Value by value onto the running sum: float addition is not associative, and the SDK adds in order.
            aggregation._sum = reduce(add, values, aggregation._sum)
            if aggregation._record_min_max:
                aggregation._min = min(aggregation._min, low)
                aggregation._max = max(aggregation._max, high)


def plain(v) -> bool:
    """A value the SDK's Histogram.record would aggregate as it is: an int or float, finite, not negative."""
    return (v.__class__ is int or v.__class__ is float) and 0 <= v <= _MAX


_MAX = sys.float_info.max  # a larger int overflows the SDK's math.isfinite: its own path raises, as it did
