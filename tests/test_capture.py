"""Body capture: bounded, decoded for capture only, chunk boundaries never matter."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clrk.proxy.capture import PIECE, BodyCapture

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

ENCODERS = {
    "gzip": lambda b: gzip.compress(b, mtime=0),
    "deflate": zlib.compress,
    "deflate-raw": lambda b: (lambda c: c.compress(b) + c.flush())(zlib.compressobj(wbits=-15)),
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def feed_split(cap: BodyCapture, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    prev = 0
    for c in sorted({min(max(c, 0), len(data)) for c in cuts}) + [len(data)]:
        out += cap.feed(data[prev:c])
        prev = c
    return out


@given(body=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 6000), max_size=20),
       enc=st.sampled_from(sorted(ENCODERS)), limit=st.integers(0, 6000))
@settings(max_examples=300, deadline=None)
def test_any_split_gives_the_same_capture_and_passes_bytes_untouched(body, cuts, enc, limit):
    wire = ENCODERS[enc](body)
    cap = BodyCapture(limit, True, "deflate" if enc == "deflate-raw" else enc)
    assert feed_split(cap, wire, cuts) == wire
    assert cap.wire_bytes == len(wire)
    if limit == 0:  # maxBytes 0 turns capture off
        assert cap.captured is None and not cap.truncated
    else:
        assert cap.captured == body[:limit]
        assert cap.truncated == (len(body) > limit)


def test_identity_capture_is_bounded_and_flags_truncation():
    cap = BodyCapture(10, True)
    for _ in range(5):
        cap.feed(b"0123456")
    assert cap.captured == b"0123456012" and cap.truncated and cap.wire_bytes == 35


def test_exact_fit_is_not_truncated():
    cap = BodyCapture(4, True)
    cap.feed(b"ab")
    cap.feed(b"cd")
    assert cap.captured == b"abcd" and not cap.truncated


def test_unwanted_content_is_counted_not_kept():
    cap = BodyCapture(100, False, "gzip")
    cap.feed(b"\x1f\x8b whatever")
    assert cap.captured is None and cap.wire_bytes == 11 and cap.decoder is None


def test_compression_bomb_costs_at_most_the_limit():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    cap = BodyCapture(1000, True, "gzip")
    cap.feed(bomb)
    assert cap.captured == b"\0" * 1000 and cap.truncated
    assert len(cap.buf) == 1000


def test_listener_sees_the_whole_decoded_body_in_bounded_pieces():
    body = bytes(range(256)) * 2000
    pieces = []
    cap = BodyCapture(100, True, "gzip", listener=pieces.append)
    cap.feed(gzip.compress(body))
    assert b"".join(pieces) == body and max(map(len, pieces)) <= PIECE
    assert cap.captured == body[:100]


def test_corrupt_encoding_is_noted_and_bytes_still_pass():
    cap = BodyCapture(100, True, "gzip")
    assert cap.feed(b"definitely not gzip") == b"definitely not gzip"
    assert cap.truncated and "does not decode" in cap.error


@pytest.mark.parametrize("enc", ["compress", "gzip, br"])
def test_unknown_or_stacked_encoding_keeps_nothing_readable(enc):
    cap = BodyCapture(100, True, enc)
    cap.feed(b"xyz")
    assert cap.captured == b"" and cap.truncated and cap.wire_bytes == 3


def test_concatenated_gzip_members():
    cap = BodyCapture(100, True, "gzip")
    cap.feed(gzip.compress(b"hello ") + gzip.compress(b"world"))
    assert cap.captured == b"hello world"


def test_which_bodies_are_buffered():
    from clrk.proxy.capture import request_is_buffered, response_is_buffered

    assert request_is_buffered({}, provider=True)  # no body: nothing to stream (a GET)
    assert request_is_buffered({"content-length": "0"}, provider=False)
    assert request_is_buffered({"content-length": "1000"}, provider=False)
    assert not request_is_buffered({"content-length": str(10 * 2**20)}, provider=False)
    assert request_is_buffered({"content-length": str(10 * 2**20)}, provider=True)
    assert not request_is_buffered({"transfer-encoding": "chunked"}, provider=True)
    assert response_is_buffered({"content-type": "application/json", "content-length": "200"})
    assert not response_is_buffered({"content-type": "text/event-stream", "content-length": "200"})
    assert not response_is_buffered({"content-type": "application/json"})
