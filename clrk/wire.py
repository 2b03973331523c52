"""The local protocol between proxy processes, the CLI and the recorder: length-prefixed msgpack frames over
a Unix socket next to the DuckDB file (mode 0600: only the gateway's user may talk to it).

Messages are maps with a type `t`:
  proxy -> recorder: {"t": "hello", "role": "proxy"|"cli", "pid": N, ["worker": I, "restarts": R]} (a worker
                     of `clrk run --workers`: its index and restart count), {"t": "rows", "rows": [...]},
                     {"t": "config", "gateways": {...}, "fallback": URL}, {"t": "flush", "id": N},
                     {"t": "lost", "n": N} (records it could not ship), {"t": "shutdown"}
                     budget ledger (clrk_budget_store=recorder; clrk.recorder.ledger): {"t": "budget_adopt"},
                     {"t": "budget_admit", "id": N}, {"t": "budget_settle", "id": N}, {"t": "budget_ping", "id": N}
  cli -> recorder:   {"t": "query", "id": N, "query": {...}}, {"t": "budget_pools", "id": N}
  recorder -> peer:  {"t": "ok", "id": N, ...} / {"t": "error", "id": N, "message": str}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import tempfile
from pathlib import Path

import msgpack
import ormsgpack

from clrk import escape, storeref

HEADER = struct.Struct("!I")
MAX_FRAME = 512 * 1024 * 1024


class WireError(Exception):
    pass


def pack(message: dict) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(data)) + data


_record_packer = msgpack.Packer(use_bin_type=True)
_ROWS_HEAD = b"\x82" + msgpack.packb("t") + msgpack.packb("rows") + msgpack.packb("rows")  # a 2-entry map


# What ormsgpack would encode where msgpack refuses (dataclasses, datetimes, enums, UUIDs) goes back to msgpack.
_ORMSGPACK_AS_MSGPACK = (ormsgpack.OPT_PASSTHROUGH_DATACLASS | ormsgpack.OPT_PASSTHROUGH_DATETIME
                         | ormsgpack.OPT_PASSTHROUGH_ENUM | ormsgpack.OPT_PASSTHROUGH_UUID)


def pack_record(record: dict) -> bytes:
    """One record, encoded as it will sit in a rows message (see `pack_rows`). Every record is encoded on the
    proxy's thread: ormsgpack writes the same bytes as msgpack's packer about three times faster. What it
    refuses (a key that is no str, a tuple subclass, an integer past 64 bits, a lone surrogate, nesting past
    its depth) is encoded by msgpack, which packs it or raises its own error, as it always did."""
    try:
        return ormsgpack.packb(record, option=_ORMSGPACK_AS_MSGPACK)
    except TypeError:
        return _record_packer.pack(record)


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries
MAX_DEPTH = 16


def encodable(value, left_out: list[str], where: str = "", depth: int = 0):
    """`value` as msgpack can carry it, for a record `pack_record` refused: a str UTF-8 cannot encode (a lone
    surrogate) becomes its bytes (`clrk.escape.to_bytes`; the recorder decodes both alike); an integer past
    64 bits, anything nested past MAX_DEPTH or of a type msgpack does not know becomes None, and where it was
    is added to `left_out`."""
    if value is None or isinstance(value, (bool, float, bytes)):
        return value
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return escape.to_bytes(value)
    if isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX:
            return value
    elif isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    elif depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        return [encodable(v, left_out, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    elif depth < MAX_DEPTH and isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and k.isascii():  # record keys are attribute names
                out[k] = encodable(v, left_out, f"{where}.{k}" if where else k, depth + 1)
            else:
                left_out.append(f"{where}[{escape.printable(repr(k))[:64]}]")
        return out
    left_out.append(where or "(the record)")
    return None


def record_ids(record) -> str:
    """A record's transaction ids for a log line, as far as it has readable ones (what `clrk records`, `tail`
    and the trace backend find the transaction by)."""
    ids = record.get("ids") if isinstance(record, dict) else None
    if not isinstance(ids, (list, tuple)) or len(ids) < 2:
        return "trace_id=? span_id=? (the record carries no ids)"
    return f"trace_id={escape.printable(str(ids[0])[:64])} span_id={escape.printable(str(ids[1])[:64])}"


def pack_rows(records: list[bytes]) -> bytes:
    """The frame of {"t": "rows", "rows": [...]} from records encoded by `pack_record`, without decoding them."""
    data = b"".join([_ROWS_HEAD, _record_packer.pack_array_header(len(records)), *records])
    return HEADER.pack(len(data)) + data


def unpack(data: bytes) -> dict:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "t" not in msg:
        raise WireError("malformed message")
    return msg


async def read_message(reader: asyncio.StreamReader) -> dict | None:
    """The next message, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise WireError("truncated frame header") from e
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes exceeds the limit")
    return unpack(await reader.readexactly(n))


def socket_path(db_path: str | os.PathLike) -> str:
    """Where the recorder for `db_path` listens: beside the file, or in the temp dir when that path is too
    long for a Unix socket (108 bytes); for a ClickHouse URL, in that store's private directory."""
    if storeref.is_clickhouse(str(db_path)):
        candidate = str(storeref.local_dir(str(db_path)) / "recorder.sock")
        if len(candidate.encode()) < 100:
            return candidate
        digest = hashlib.sha256(storeref.key(str(db_path)).encode()).hexdigest()[:20]
        return os.path.join(tempfile.gettempdir(), f"clrk-ch-{digest}.sock")
    db = Path(db_path).resolve()
    candidate = str(db) + ".sock"
    if len(candidate.encode()) < 100:
        return candidate
    digest = hashlib.sha256(str(db).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"clrk-{digest}.sock")


def recorder_ready(socket_file: str) -> bool:
    """Whether a recorder answers on `socket_file` (the gateway it serves is up)."""
    if not os.path.exists(socket_file):
        return False
    try:
        with BlockingClient(socket_file, timeout=2) as c:
            c.request({"t": "status"})
        return True
    except (OSError, WireError):
        return False


class BlockingClient:
    """A synchronous connection to the recorder, for the CLI."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._next_id = 0
        self.send({"t": "hello", "role": "cli", "pid": os.getpid()})

    def send(self, message: dict) -> None:
        self.sock.sendall(pack(message))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise WireError("recorder closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, message: dict) -> dict:
        self._next_id += 1
        message = dict(message, id=self._next_id)
        self.send(message)
        (n,) = HEADER.unpack(self._recv_exact(HEADER.size))
        reply = unpack(self._recv_exact(n))
        if reply.get("t") == "error":
            raise WireError(reply.get("message", "recorder error"))
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
