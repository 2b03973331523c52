"""Bounded body capture on the pass-through: every chunk is counted and forwarded untouched; at most
`limit` bytes of the *decoded* body are kept.

Runs inside mitmproxy's stream callables, i.e. on the event loop, once per chunk: the work is O(chunk) and
stops as soon as nothing more is needed (capture full, nobody else listening). Content-Encoding is undone
for the capture only, in pieces of bounded size, so a compression bomb costs at most `limit` bytes of
memory; the agent always receives the upstream's bytes exactly.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator

import brotli

try:  # Python 3.14+
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd  # type: ignore[no-redef]

log = logging.getLogger("clrk")

PIECE = 64 * 1024  # largest decoded piece held at once
BUFFER_LIMIT = 256 * 1024  # a body of known length up to this is buffered by mitmproxy, not streamed
PROVIDER_BUFFER_LIMIT = 32 * 1024 * 1024  # provider requests are read whole (model, rewrites, budgets)
# Decoding for capture and usage is bounded whoever sent the body: at most DECODE_RATIO decoded bytes per
# wire byte (plus DECODE_SLACK), DECODE_LIMIT in all, DECODE_SECONDS of the event loop's time per body. Real
# JSON and event streams stay far below; a decompression bomb stops there, its bytes still relayed untouched.
DECODE_RATIO = 50
DECODE_SLACK = 1024 * 1024
DECODE_LIMIT = 256 * 1024 * 1024
DECODE_SECONDS = 0.5


def _known_length_at_most(headers, limit: int) -> bool:
    cl = headers.get("content-length")
    return cl is not None and cl.isdigit() and int(cl) <= limit and "transfer-encoding" not in headers


def request_is_buffered(headers, provider: bool) -> bool:
    """Whether a request body is left to mitmproxy to buffer (else it is streamed through the capture).
    Streaming a small body of known length buys nothing and costs a write per chunk; no body (no
    Transfer-Encoding, no or a zero Content-Length) is buffered trivially. One pass over the headers: several
    steps ask, for every provider call."""
    if "transfer-encoding" in headers:
        return False
    cl = headers.get("content-length")
    return (cl is None or cl == "" or cl == "0"
            or (cl.isdigit() and int(cl) <= (PROVIDER_BUFFER_LIMIT if provider else BUFFER_LIMIT)))


def response_is_buffered(headers) -> bool:
    """Event streams and large or unknown-length responses are streamed: the agent gets every byte as it comes."""
    ctype = headers.get("content-type") or ""
    return not ctype.startswith("text/event-stream") and _known_length_at_most(headers, BUFFER_LIMIT)


class DecodeError(Exception):
    pass


class StreamDecoder:
    """Incremental Content-Encoding decoder (gzip, deflate, br, zstd) yielding bounded pieces."""

    SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})

    def __init__(self, encoding: str):
        self.encoding = encoding
        self._z: zlib._Decompress | None = None
        self._br = None
        self._zstd = None
        self._first = True
        self._head = b""
        if encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "br":
            self._br = brotli.Decompressor()
        elif encoding == "zstd":
            self._zstd = zstd.ZstdDecompressor()
        elif encoding != "deflate":
            raise DecodeError(f"unsupported content-encoding {encoding!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            if self.encoding == "deflate" and self._first:
                # RFC 9110 deflate is zlib-wrapped, but servers also send raw deflate: the 2-byte zlib header
                # tells, so hold bytes until two have arrived.
                data = self._head + data
                if len(data) < 2:
                    self._head = data
                    return
                self._head = b""
                is_zlib = (data[0] & 0x0F) == 8 and (data[0] * 256 + data[1]) % 31 == 0
                self._z = zlib.decompressobj(zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS)
            self._first = False
            if self._z is not None:
                yield from self._feed_zlib(data)
            elif self._br is not None:
                yield from self._feed_brotli(data)
            elif self._zstd is not None:
                yield from self._feed_zstd(data)
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
            raise DecodeError(f"{self.encoding} body does not decode: {e}") from e

    def _feed_zlib(self, data: bytes) -> Iterator[bytes]:
        z = self._z
        assert z is not None
        while True:
            out = z.decompress(data, PIECE)
            if out:
                yield out
            data = z.unconsumed_tail
            if z.eof and z.unused_data and self.encoding in ("gzip", "x-gzip"):
                # Concatenated gzip members are one body (RFC 1952 §2.2).
                data = z.unused_data
                self._z = z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                continue
            if len(out) < PIECE and not data:
                return

    def _feed_brotli(self, data: bytes) -> Iterator[bytes]:
        br = self._br
        out = br.process(data, output_buffer_limit=PIECE)
        if out:
            yield out
        while not br.can_accept_more_data():
            out = br.process(b"", output_buffer_limit=PIECE)
            if not out:
                return
            yield out

    def _feed_zstd(self, data: bytes) -> Iterator[bytes]:
        d = self._zstd
        while True:
            out = d.decompress(data, PIECE)
            if out:
                yield out
            data = b""
            if d.eof:
                rest = d.unused_data
                if not rest:
                    return
                self._zstd = d = zstd.ZstdDecompressor()  # next frame
                data = rest
                continue
            if d.needs_input:
                return


class BodyCapture:
    """One direction of one transaction: counts wire bytes, keeps at most `limit` decoded bytes.

    `listener`, when set, receives every decoded piece (provider parsers need the whole body, e.g. usage at
    the end of a stream), in bounded memory; without one, decoding stops once the capture is full.
    """

    __slots__ = ("limit", "applies", "wanted", "wire_bytes", "buf", "truncated", "decoder", "listener", "error", "_active",
                 "decoded", "decode_seconds", "first_at")

    def __init__(
        self,
        limit: int,
        wanted: bool,
        content_encoding: str | None = None,
        listener: Callable[[bytes], None] | None = None,
    ):
        self.limit = limit
        self.applies = self.wanted = wanted and limit > 0
        self.wire_bytes = 0
        self.buf = bytearray()
        self.truncated = False
        self.listener = listener
        self.error: str | None = None
        self.decoder: StreamDecoder | None = None
        self.decoded = 0  # decoded bytes so far (encoded bodies only)
        self.decode_seconds = 0.0
        self.first_at = 0.0  # epoch seconds of the first bytes (time to first chunk of a stream)
        enc = (content_encoding or "").strip().lower()
        if enc and enc != "identity" and (self.wanted or listener):
            if enc in StreamDecoder.SUPPORTED:
                self.decoder = StreamDecoder(enc)
            else:
                # Stacked or unknown encodings: keep nothing rather than bytes nobody can read.
                self.error = f"content-encoding {enc!r} not decoded for capture"
                self.wanted = False
                self.truncated = True
                self.listener = None
        self._active = self.wanted or self.listener is not None

    def feed(self, chunk: bytes) -> bytes:
        """Called with each chunk on its way through; returns it unchanged."""
        if not self.wire_bytes and chunk:
            self.first_at = time.time()
        self.wire_bytes += len(chunk)
        if self._active and chunk:
            if self.decoder is None:
                self._take(chunk)
            else:
                self._decode(chunk)
        return chunk

    def _decode(self, chunk: bytes) -> None:
        t0 = time.perf_counter()
        allowance = min(DECODE_LIMIT, DECODE_RATIO * self.wire_bytes + DECODE_SLACK)
        try:
            for piece in self.decoder.feed(chunk):  # type: ignore[union-attr]
                self.decoded += len(piece)
                self._take(piece)
                if not self._active:
                    break
                if self.decoded > allowance:
                    self._stop(f"decoding stopped after {self.decoded} bytes from {self.wire_bytes} on the wire "
                               f"(more than {DECODE_RATIO}:1 or {DECODE_LIMIT} bytes: a compression bomb?)")
                    break
        except DecodeError as e:
            self._stop(str(e))
        self.decode_seconds += time.perf_counter() - t0
        if self._active and self.decode_seconds > DECODE_SECONDS:
            self._stop(f"decoding stopped after {self.decode_seconds:.2f} s of work on this body")

    def _stop(self, why: str) -> None:
        log.warning("clrk: body capture: %s", why)
        self.error = why
        self.truncated = True
        self._active = False

    def _take(self, data: bytes) -> None:
        if self.listener is not None:
            self.listener(data)
        if self.wanted:
            room = self.limit - len(self.buf)
            if len(data) <= room:
                self.buf += data
            else:
                if room > 0:
                    self.buf += data[:room]
                self.truncated = True
                self.wanted = False
                self._active = self.listener is not None

    @property
    def captured(self) -> bytes | None:
        """The kept body, or None when this content type is not captured."""
        return bytes(self.buf) if self.applies else None
