"""`clrk.providers.shallow`: the top-level members of a JSON object without building it, and edits in place."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clrk.providers import shallow
from clrk.providers.base import loads

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
_objects = st.dictionaries(st.text(max_size=10), _values, max_size=8)


@given(_objects, st.sampled_from([None, 1, 2]), st.booleans())
@settings(max_examples=400, deadline=None)
def test_members_are_what_json_reads(doc, indent, ascii_only):
    body = json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()
    spans = shallow.members(body)
    assert spans is not None
    assert {k: json.loads(body[a:b]) for k, (a, b, _) in spans.items()} == doc


@given(_objects, st.dictionaries(st.sampled_from(["model", "stream_options", "n", "x y"]), _values, min_size=1),
       st.sampled_from([None, 1]))
@settings(max_examples=400, deadline=None)
def test_splice_sets_the_edited_members_and_keeps_the_rest(doc, edits, indent):
    body = json.dumps(doc, indent=indent).encode()
    out = shallow.splice(body, shallow.members(body), edits)
    assert json.loads(out) == {**doc, **edits}
    for key in set(doc) - set(edits):  # untouched members are byte for byte the agent's
        a, b, _ = shallow.members(body)[key]
        assert body[a:b] in out


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@settings(max_examples=500, deadline=None)
def test_members_of_garbage_is_none_or_agrees_with_json(data):
    spans = shallow.members(data)
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if spans is not None:  # whatever the walk accepts, json reads the same way
        assert isinstance(doc, dict)
        assert {k: json.loads(data[a:b]) for k, (a, b, _) in spans.items()} == doc
    elif isinstance(doc, dict):
        pytest.fail(f"a JSON object was not read: {data!r}")


def test_large_members_are_elided_and_counted():
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 100}] * 1000, "prompt": [[1, 2], [3]] * 20000,
                       "ids": list(range(30000)), "model": "gpt-4o", "n": 2}).encode()
    doc = shallow.shallow_doc(body, shallow.members(body), loads)
    assert doc["model"] == "gpt-4o" and doc["n"] == 2
    assert isinstance(doc["messages"], shallow.Elided) and doc["messages"].count == 1000
    assert doc["prompt"].kind == "[" and doc["prompt"].count == 40000
    assert doc["ids"].count == 0  # scalars are not counted: one prompt of token ids


def test_a_body_too_complex_to_walk_within_bounds_is_not_read():
    body = b'{"a":' + b"[" * 300_000 + b"]" * 300_000 + b',"model":"gpt-4o"}'
    assert shallow.members(body) is None
    assert shallow.members(b'{"a":[[],[]],"model":"m"}', max_tokens=3) is None
    assert shallow.members(b'{"a":[[],[]],"model":"m"}', max_tokens=6) is not None


@pytest.mark.parametrize("body", [b'{"a":1,}', b'{"a":1 "b":2}', b'{"a":[1}', b'["a"]', b'{"a":1}x', b'{"a"}', b'{"a":}',
                                  b'{"a":"\\"}'])
def test_not_one_object(body):
    assert shallow.members(body) is None
