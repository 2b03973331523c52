"""The embedded DuckDB store: one `records` table whose columns are `clrk.attributes.COLUMNS`.

Rows are inserted in batches, one INSERT per batch with a list parameter per column (`unnest`): a bulk insert
costs microseconds per row where `executemany` costs about a millisecond. A batch with a value that does not
have its column's Python type exactly goes the way it went before, as an Arrow table (`to_arrow`, `storable`):
pyarrow, and the pandas it loads, are imported only then (they are ~80 MB of the recorder's memory). The schema is versioned in `clrk_schema`; attributes added later become
columns through `_migrate`. Only the recorder process opens the file for writing; readers either ask the
recorder over its socket or, when no gateway runs, open the file read-only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import duckdb
import orjson

from clrk import attributes as A
from clrk import escape
from clrk.procstat import resident

log = logging.getLogger("clrk.recorder")

SCHEMA_VERSION = 1
TABLE = "records"
SEQ = "_seq"  # ingestion order, assigned by the recorder: what `clrk tail` follows (times are start times)

STORE_COLUMNS = {**A.COLUMNS, SEQ: "BIGINT"}

# How the recorder keeps DuckDB's memory in bounds (docs/PERFORMANCE.md, "Memory"). With DuckDB's defaults,
# 100,000 ordinary records took a recorder from ≈ 92 MB to ≈ 185 (to ≈ 136 with these):
# - ROW_GROUP_SIZE: a checkpoint rewrites the row group being filled whole, so what it holds at once grows with
#   the group (DuckDB's default is 122,880 rows: a day's first 100k records are one group). An option of ATTACH,
#   not kept in the file: readers are unaffected.
# - CHECKPOINT_THRESHOLD: a checkpoint also holds everything appended since the last one (DuckDB's default
#   waits for 16 MiB of write-ahead log).
# - REOPEN_AFTER: what DuckDB keeps besides (blocks that are in the file, and more that it does not count) is
#   given back only when the database is closed. So once a row group is complete and the process has grown by
#   this much since the store was opened, the store is closed and opened again (`Store._refresh`), at a moment
#   when that is cheap: its write-ahead log empty (tens of milliseconds; else seconds).
# A lasting `memory_limit` is not the way, nor is a moment's one to make DuckDB drop its cache: after either,
# records of 8–16 KiB bodies were written several times slower (docs/PERFORMANCE.md).
CATALOG = "clrk_store"
ROW_GROUP_SIZE = 4096
CHECKPOINT_THRESHOLD = "4MB"
REOPEN_AFTER = 16 << 20
REOPEN_WAIT = 1.0  # seconds a reopen waits for the reads running
_TIME_COLUMNS = tuple(k for k, t in A.COLUMNS.items() if t == "TIMESTAMPTZ")
_JSON_COLUMNS = tuple(k for k, t in A.COLUMNS.items() if t == "JSON")
_TIME_SET, _JSON_SET = frozenset(_TIME_COLUMNS), frozenset(_JSON_COLUMNS)
_SCHEMA_NAMES = frozenset(A.COLUMNS)


def q(name: str) -> str:
    """A quoted SQL identifier (attribute names contain dots)."""
    return '"' + name.replace('"', '""') + '"'


class StoreError(Exception):
    pass


class Store:
    """Read-write access to the store, for the recorder process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one write (or reopen) at a time
        self.wal = Path(f"{self.path}.wal")
        self._gate = threading.Condition()  # over the reads running and a reopen waiting for them
        self._readers = 0
        self._reopening = False  # no read starts meanwhile
        self.rows = 0  # in the table, as this process wrote them (DuckDB fills row groups in that order)
        self.reopen_due = False
        self.reopens = 0  # by `_refresh`
        self._opened_at = 0  # resident bytes once opened
        self._open()

    def _open(self) -> None:
        con = duckdb.connect()
        try:
            # Attached rather than opened, for the row group size; the temporary directory is where opening the
            # file would have put it (an in-memory database's default is `.tmp` in the working directory).
            path = str(self.path).replace("'", "''")
            con.execute(f"SET temp_directory = '{path}.tmp'")
            con.execute(f"ATTACH '{path}' AS {CATALOG} (ROW_GROUP_SIZE {ROW_GROUP_SIZE})")
            con.execute(f"USE {CATALOG}")
            con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            self.con = con
            self._migrate()
            top, self.rows = con.execute(f"SELECT max({q(SEQ)}), count(*) FROM {TABLE}").fetchone()
        except BaseException as e:
            con.close()  # the database with it: nothing is left holding the file
            if isinstance(e, duckdb.IOException):
                raise StoreError(f"cannot open {self.path} for writing: {e}") from e
            raise
        self.next_seq = (top or 0) + 1
        self._opened_at = resident() or 0
        self.reopen_due = False

    def reopen(self) -> None:
        """A fresh connection after a failed write (DuckDB invalidates a database after some I/O errors). Reads
        that are running are waited for as by `_refresh`, but not past REOPEN_WAIT: the store is broken."""
        self._reopen(must=True)

    def _migrate(self) -> None:
        con = self.con
        con.execute("CREATE TABLE IF NOT EXISTS clrk_schema (version INTEGER NOT NULL)")
        row = con.execute("SELECT max(version) FROM clrk_schema").fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this clrk ({SCHEMA_VERSION}): upgrade clrk"
            )
        if version == 0:
            cols = ", ".join(f"{q(n)} {t}" for n, t in STORE_COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({cols})")
            con.execute("INSERT INTO clrk_schema VALUES (?)", [SCHEMA_VERSION])
        # Attributes added since the table was created become new (nullable) columns.
        have = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
                                          [CATALOG, TABLE]).fetchall()}
        for name, typ in STORE_COLUMNS.items():
            if name not in have:
                con.execute(f"ALTER TABLE {TABLE} ADD COLUMN {q(name)} {typ}")

    def insert(self, rows: list[Mapping]) -> list[Mapping]:
        """Inserts a batch; returns the rows written (see `storable` for a batch with a value that fits no column)."""
        if not rows:
            return rows
        if self.reopen_due and self._checkpointed():
            self._refresh()
        seq = self.next_seq
        batch = columns(rows, seq)
        if batch is not None:
            sql, params = batch
            try:
                with self._lock:
                    cur = self.cursor()  # as the Arrow way and the reads: a connection of its own
                    try:
                        cur.execute(sql, params)
                    finally:
                        cur.close()
                    self.next_seq = seq + len(rows)
                    self._written(len(rows))
                return rows
            except (duckdb.IOException, duckdb.FatalException, duckdb.OutOfMemoryException):
                raise  # the store's trouble, not the batch's: the rows wait (`Recorder.flush`)
            except (duckdb.Error, TypeError, ValueError, OverflowError):
                pass  # a value DuckDB would not take: the Arrow way below says which (an INSERT is all or nothing)
        try:
            table = to_arrow(rows, seq)
        except Exception:  # one row's value does not fit its column: it must not hold the whole batch back
            rows = storable(rows)
            table = to_arrow(rows, seq)
        self.next_seq = seq + len(rows)
        with self._lock:
            cur = self.cursor()
            try:
                cur.register("clrk_batch", table)
                cur.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM clrk_batch")
            finally:
                cur.close()
            self._written(len(rows))
        return rows

    def _written(self, n: int) -> None:
        """After a write of `n` rows (under `_lock`): once they complete a row group, and the process has grown
        by REOPEN_AFTER since the store was opened, the next write reopens it first (`_refresh`)."""
        before, self.rows = self.rows, self.rows + n
        if before // ROW_GROUP_SIZE != self.rows // ROW_GROUP_SIZE and (resident() or 0) - self._opened_at >= REOPEN_AFTER:
            self.reopen_due = True

    def _checkpointed(self) -> bool:
        """Whether everything written is in the file, its write-ahead log empty. Closing the store otherwise
        checkpoints it, which with 8–16 KiB bodies rereads every row group: seconds, not milliseconds."""
        try:
            return self.wal.stat().st_size == 0
        except OSError:  # no log at all
            return True

    def _refresh(self) -> None:
        """Closes and reopens the store, which gives back what DuckDB kept. Reads that are running are waited
        for (REOPEN_WAIT at most, else the next write tries again), and none starts meanwhile. Done before a
        write, not after: a failure here is the write's, and its rows wait (`Recorder.flush`) instead of being
        taken for unwritten when they were."""
        if self._reopen(must=False):
            self.reopens += 1

    def _reopen(self, must: bool) -> bool:
        with self._lock, self._gate:
            self._reopening = True
            try:
                if not self._gate.wait_for(lambda: not self._readers, REOPEN_WAIT) and not must:
                    return False
                try:
                    self.con.close()
                except Exception:
                    if not must:
                        raise
                self._open()
                return True
            finally:
                self._reopening = False
                self._gate.notify_all()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own to the store (a new cursor starts in DuckDB's in-memory catalog)."""
        cur = self.con.cursor()
        cur.execute(f"USE {CATALOG}")
        return cur

    def stamp(self, rows: list[Mapping]) -> None:
        """Nothing: a DuckDB row gets its `_seq` as it is written (the ClickHouse store stamps earlier)."""

    # The reads the recorder serves; `clrk.recorder.clickhouse.ClickHouseStore` has the same.
    def records(self, query: Mapping) -> list[dict]:
        return self._read(fetch_records, query)

    def spend(self, query: Mapping) -> list[dict]:
        return self._read(fetch_spend, query)

    def budgets(self, since: float) -> list[dict]:
        return self._read(fetch_budgets, since)

    def totals(self, since: float) -> tuple[dict[str, int], dict[str, float]]:
        return self._read(budget_totals, since), self._read(budget_cost_totals, since)

    def _read(self, fn, arg):
        with self._gate:
            self._gate.wait_for(lambda: not self._reopening)
            self._readers += 1
        try:
            cur = self.cursor()
            try:
                return fn(cur, arg)
            finally:
                cur.close()
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    def error_text(self, e: BaseException) -> str:
        return str(e)

    def close(self) -> None:
        with self._lock:
            self.con.close()


_I64, _I32 = (-(2**63), 2**63 - 1), (-(2**31), 2**31 - 1)


def _fits(typ: str, v) -> bool:
    """Whether a value has exactly the Python type its column takes (ints in range); anything else goes the
    Arrow way, which decides as it always did."""
    t = type(v)
    if typ == "VARCHAR":
        return t is str
    if typ == "BIGINT":
        return t is int and _I64[0] <= v <= _I64[1]
    if typ == "INTEGER":
        return t is int and _I32[0] <= v <= _I32[1]
    if typ == "BOOLEAN":
        return t is bool
    if typ == "DOUBLE":
        return t is float or (t is int and -(2**53) <= v <= 2**53)  # exactly a double
    if typ == "TIMESTAMPTZ":
        return (t is float and math.isfinite(v)) or t is int
    if typ == "JSON":
        return t in (str, dict, list)
    if typ == "VARCHAR[]":
        return t is list and all(x is None or type(x) is str for x in v)
    return False


_NONE = type(None)
# The Python types a column's values may have (`_fits`), checked for a whole column at once: the set of the
# types present is made in C; only a column with ints (ranges) or lists (items) looks at its values one by one.
_TYPES = {typ: frozenset({_NONE, *ts}) for typ, ts in (
    ("VARCHAR", (str,)), ("BIGINT", (int,)), ("INTEGER", (int,)), ("BOOLEAN", (bool,)), ("DOUBLE", (float, int)),
    ("TIMESTAMPTZ", (float, int)), ("JSON", (str, dict, list)), ("VARCHAR[]", (list,)))}
_STR_OR_NONE = frozenset({str, _NONE})
_RANGES = {"BIGINT": _I64, "INTEGER": _I32, "DOUBLE": (-(2**53), 2**53)}  # a DOUBLE's ints: exactly a double


def _column_fits(typ: str, vals: list) -> bool:
    """Whether every value of a column `_fits` it (None for a row without it)."""
    types = set(map(type, vals))
    if not types <= _TYPES[typ]:
        return False
    if typ == "VARCHAR[]":
        return all(v is None or set(map(type, v)) <= _STR_OR_NONE for v in vals)
    if int in types and typ in _RANGES:
        lo, hi = _RANGES[typ]
        ints = [v for v in vals if type(v) is int]
        return lo <= min(ints) and max(ints) <= hi
    return True  # a time that is not finite: the conversion to microseconds refuses it (`columns`)


def _json_text(v) -> str:
    """A JSON column's text, as `json.dumps(v, separators=(",", ":"))` writes it. Headers (str to str) go through
    orjson, whose bytes are the same when they are ASCII without DEL (json escapes the rest as \\u); any other
    value, or such a header, takes json."""
    if type(v) is dict and set(map(type, v.values())) <= _STR_ONLY:
        try:
            b = orjson.dumps(v)  # a key that is not str, or a lone surrogate, raises: json decides
        except TypeError:
            pass
        else:
            if b.isascii() and b"\x7f" not in b:
                return b.decode()
    return json.dumps(v, separators=(",", ":"))


_STR_ONLY = frozenset({str})
# Values a column may pass once for the whole batch: equal values of these types, in a column whose types
# `_column_fits` has checked, are one stored value (no DOUBLE: 0 == -0.0 there; str, int and bool columns hold
# only their own type and None, which equals none of them).
_SCALAR = frozenset({str, int, bool})
_CAST = {"VARCHAR": "VARCHAR[]", "JSON": "VARCHAR[]", "BIGINT": "BIGINT[]", "INTEGER": "INTEGER[]",
         "BOOLEAN": "BOOLEAN[]", "DOUBLE": "DOUBLE[]", "TIMESTAMPTZ": "BIGINT[]", "VARCHAR[]": "VARCHAR[][]"}
_EPOCH = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"


def columns(rows: list[Mapping], first_seq: int) -> tuple[str, list] | None:
    """The INSERT of a batch as one list parameter per column present (epoch-second times as microseconds
    after the epoch, JSON columns as text); None when a value does not have its column's type exactly."""
    cols: dict[str, list] = {}
    n = len(rows)
    ignored: list = [None] * n  # where the values of keys that are no column go (the Arrow way left them out too)
    for i, r in enumerate(rows):
        for k, v in r.items():
            try:
                cols[k][i] = v
            except KeyError:
                if v is None:
                    continue  # a column only once a row has a value for it
                typ = STORE_COLUMNS.get(k)
                col = cols[k] = ignored if typ is None or k == SEQ else [None] * n
                col[i] = v
    sel, params = [], []
    for k, vals in cols.items():
        if vals is ignored:
            continue
        typ = STORE_COLUMNS[k]
        if not _column_fits(typ, vals):
            return None
        if typ == "TIMESTAMPTZ":
            try:
                vals = [None if v is None else int(v * 1_000_000) for v in vals]
            except (OverflowError, ValueError):
                return None
            sel.append(f"{_EPOCH} + to_microseconds(unnest(?::BIGINT[])) AS {q(k)}")
        else:
            if typ == "JSON":
                try:
                    vals = [v if v is None or type(v) is str else _json_text(v) for v in vals]
                except (TypeError, ValueError):
                    return None
            first = vals[0]
            if type(first) in _SCALAR and typ != "DOUBLE" and vals.count(first) == n:
                # The same value in every row (the gateway, the component, a batch's one agent...): one scalar,
                # which DuckDB repeats for the rows, instead of a list it turns into n values (~0.25 µs each).
                sel.append(f"?::{_CAST[typ][:-2]} AS {q(k)}")
                params.append(first)
                continue
            sel.append(f"unnest(?::{_CAST[typ]}) AS {q(k)}")
        params.append(vals)
    sel.append(f"unnest(?::BIGINT[]) AS {q(SEQ)}")
    params.append(list(range(first_seq, first_seq + n)))
    return f"INSERT INTO {TABLE} BY NAME SELECT {', '.join(sel)}", params


_ARROW: dict = {}


def _arrow():
    """pyarrow and the store's Arrow schema, imported at the first batch that needs them."""
    if not _ARROW:
        import pyarrow as pa

        types = {
            "VARCHAR": pa.string(),
            "JSON": pa.string(),
            "BIGINT": pa.int64(),
            "INTEGER": pa.int32(),
            "BOOLEAN": pa.bool_(),
            "DOUBLE": pa.float64(),
            "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
            "VARCHAR[]": pa.list_(pa.string()),
        }
        _ARROW["pa"] = pa
        _ARROW["schema"] = pa.schema([pa.field(name, types[t]) for name, t in STORE_COLUMNS.items()])
    return _ARROW["pa"], _ARROW["schema"]


def _prepare(key: str, value):
    """A record value in its Arrow form: epoch seconds as microseconds, JSON columns as text."""
    if key in _TIME_SET:
        return int(value * 1_000_000)
    if key in _JSON_SET and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"))
    return value


def to_arrow(rows: Iterable[Mapping], first_seq: int = 0):
    """Record dicts (epoch-second times, header dicts) as an Arrow table of the store's schema."""
    pa, schema = _arrow()
    prepared = []
    for i, r in enumerate(rows):
        r = dict(r)
        r[SEQ] = first_seq + i
        for k in _TIME_COLUMNS:
            v = r.get(k)
            if v is not None:
                r[k] = int(v * 1_000_000)
        for k in _JSON_COLUMNS:
            v = r.get(k)
            if v is not None and not isinstance(v, str):
                r[k] = json.dumps(v, separators=(",", ":"))
        prepared.append(r)
    return pa.Table.from_pylist(prepared, schema=schema)


_BUDGET_COUNTS = frozenset({A.CLRK_BUDGET_TOKENS, A.CLRK_BUDGET_DAILY_USED, A.CLRK_BUDGET_DAILY_MAX})
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def storable(rows: Iterable[Mapping]) -> list[Mapping]:
    """The rows of a batch Arrow refused, each as it can be stored: whole if it converts; else without the
    values that fit no column (a status code of 99999999999 from an upstream, say), named in
    `clrk.record.incomplete` (a budget count past 64 bits is kept at the largest one instead: the pool stays
    spent); else not at all, when its ids or start time are what does not fit (logged with its ids)."""
    out = []
    for r in rows:
        try:
            to_arrow([r])
            out.append(r)
            continue
        except Exception:  # noqa: S112 - the row is mended below
            pass
        fixed, left_out = _fit(r)
        if fixed is None:
            log.error("a record that cannot be stored (its ids or start time fit no column) is dropped: "
                      "trace_id=%s span_id=%s", escape.printable(str(r.get(A.TRACE_ID))[:64]),
                      escape.printable(str(r.get(A.SPAN_ID))[:64]))
            continue
        log.warning("record trace_id=%s span_id=%s is stored without %s: the values fit no column",
                    fixed[A.TRACE_ID], fixed[A.SPAN_ID], ", ".join(left_out))
        out.append(fixed)
    return out


def _fit(row: Mapping) -> tuple[dict | None, list[str]]:
    fixed: dict = {}
    left_out: list[str] = []
    for key, value in row.items():
        if key not in _SCHEMA_NAMES or value is None:
            continue
        try:
            pa, schema = _arrow()
            pa.array([_prepare(key, value)], type=schema.field(key).type)
            fixed[key] = value
        except Exception:
            if key in _BUDGET_COUNTS and isinstance(value, int) and not isinstance(value, bool):
                fixed[key] = min(max(value, INT64_MIN), INT64_MAX)
                left_out.append(f"{key} (kept at the 64-bit limit)")
            else:
                left_out.append(key)
    if not {A.TIME, A.TRACE_ID, A.SPAN_ID} <= fixed.keys():
        return None, left_out
    why = f"store: {', '.join(left_out)} did not fit its column"
    before = fixed.get(A.CLRK_RECORD_INCOMPLETE)
    fixed[A.CLRK_RECORD_INCOMPLETE] = f"{before}; {why}" if isinstance(before, str) else why
    return fixed, left_out


# --------------------------------------------------------------------------- queries (recorder and offline CLI)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """`1h`, `30m`, `2d` (ago) or an ISO 8601 time; naive times are UTC."""
    now = now or dt.datetime.now(dt.UTC)
    m = _DURATION_RE.match(value)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"--since {value!r}: use a duration like 15m, 1h, 2d or an ISO time like 2026-11-30T10:00:00Z") from e
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def records_sql(query: Mapping) -> tuple[str, list]:
    """SQL for `clrk records` filters: agent, since, status, host, invocation, decision, mcp, limit (0 = all);
    newest first. With `after_seq`: the records stored after that one, in the order they were stored."""
    where, params = [], []
    if query.get("agent"):
        agent = str(query["agent"])
        if "/" in agent:
            ns, name = agent.split("/", 1)
            where.append(f"{q(A.AGENT_NAMESPACE)} = ? AND {q(A.AGENT_NAME)} = ?")
            params += [ns, name]
        elif "." in agent and agent.count(".") >= 1 and not agent.endswith("."):
            ns, name = agent.rsplit(".", 1)
            where.append(f"(({q(A.AGENT_NAMESPACE)} = ? AND {q(A.AGENT_NAME)} = ?) OR {q(A.AGENT_NAME)} = ?)")
            params += [ns, name, agent]
        else:
            where.append(f"{q(A.AGENT_NAME)} = ?")
            params.append(agent)
    if query.get("since"):
        where.append(f"{q(A.TIME)} >= ?")
        params.append(parse_since(str(query["since"])))
    if query.get("status") is not None:
        where.append(f"{q(A.HTTP_RESPONSE_STATUS_CODE)} = ?")
        params.append(int(query["status"]))
    if query.get("host"):
        host = str(query["host"]).lower().rstrip(".")
        if host.startswith("*."):
            where.append(f"{q(A.SERVER_ADDRESS)} LIKE ?")
            params.append("%" + host[1:].replace("%", r"\%").replace("_", r"\_"))
        else:
            where.append(f"{q(A.SERVER_ADDRESS)} = ?")
            params.append(host)
    if query.get("invocation"):
        where.append(f"{q(A.INVOCATION_ID)} = ?")
        params.append(str(query["invocation"]))
    if query.get("decision"):
        where.append(f"{q(A.CLRK_DECISION)} = ?")
        params.append(str(query["decision"]))
    if query.get("mcp"):
        where.append(f"({q(A.MCP_METHOD_NAME)} IS NOT NULL OR {q(A.JSONRPC_REQUEST_ID)} IS NOT NULL)")
    if query.get("after_seq") is not None:
        where.append(f"{q(SEQ)} > ?")
        params.append(int(query["after_seq"]))
    sql = f"SELECT * FROM {TABLE}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {q(SEQ)} ASC" if query.get("after_seq") is not None else f" ORDER BY {q(A.TIME)} DESC"
    limit = int(query.get("limit", 100) or 0)
    if limit > 0:
        sql += f" LIMIT {limit}"
    return sql, params


def _json_value(v):
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return v


def fetch_records(cur: duckdb.DuckDBPyConnection, query: Mapping) -> list[dict]:
    """Rows as JSON-ready dicts (RFC 3339 UTC times, parsed headers, no null values), newest first."""
    sql, params = records_sql(query)
    res = cur.execute(sql, params)
    names = [d[0] for d in res.description]
    keep_seq = query.get("after_seq") is not None
    out = []
    for row in res.fetchall():
        rec = {}
        for k, v in zip(names, row, strict=True):
            if v is None or (k == SEQ and not keep_seq):
                continue
            if k in _JSON_COLUMNS and isinstance(v, str):
                v = json.loads(v)
            rec[k] = _json_value(v)
        out.append(rec)
    return out


SPEND_DIMENSIONS = {
    "day": f"CAST(({q(A.TIME)} AT TIME ZONE 'UTC') AS DATE)",
    "agent": f"{q(A.AGENT_NAMESPACE)} || '/' || {q(A.AGENT_NAME)}",
    "route": f"{q(A.CLRK_APR_NAMESPACE)} || '/' || {q(A.CLRK_APR_NAME)}",
    "model": f"{q(A.GEN_AI_REQUEST_MODEL)}",
}


def spend_sql(query: Mapping) -> tuple[str, list]:
    """Token and dollar spend of provider calls grouped by any of day, agent, route, model (`by`), newest day
    first, then by tokens (or by dollars with `usd`). `cost_usd` sums the priced calls; `unpriced` counts the
    calls whose usage was seen but whose model has no known price (their dollars are not in `cost_usd`)."""
    by = [d for d in (query.get("by") or list(SPEND_DIMENSIONS)) if d in SPEND_DIMENSIONS]
    cols = [f"{SPEND_DIMENSIONS[d]} AS {d}" for d in by]
    inp, out = q(A.GEN_AI_USAGE_INPUT_TOKENS), q(A.GEN_AI_USAGE_OUTPUT_TOKENS)
    cols += [
        "count(*) AS requests",
        f"coalesce(sum({inp}), 0) AS input_tokens",
        f"coalesce(sum({out}), 0) AS output_tokens",
        f"coalesce(sum(coalesce({inp}, 0) + coalesce({out}, 0)), 0) AS total_tokens",
        f"count(*) FILTER (WHERE {q(A.CLRK_BUDGET_DENIED)}) AS budget_denied",
        f"coalesce(sum({q(A.GEN_AI_USAGE_COST)}), 0) AS cost_usd",
        f"count(*) FILTER (WHERE {q(A.CLRK_COST_SOURCE)} = 'unknown') AS unpriced",
        *COST_PARTS_DUCKDB,
    ]
    where, params = [f"{q(A.GEN_AI_SYSTEM)} IS NOT NULL"], []
    if query.get("since"):
        where.append(f"{q(A.TIME)} >= ?")
        params.append(parse_since(str(query["since"])))
    for key, dim in (("agent", "agent"), ("route", "route"), ("model", "model")):
        if query.get(key):
            where.append(f"{SPEND_DIMENSIONS[dim]} = ?")
            params.append(str(query[key]))
    sql = f"SELECT {', '.join(cols)} FROM {TABLE} WHERE {' AND '.join(where)}"
    if by:
        sql += " GROUP BY " + ", ".join(str(i + 1) for i in range(len(by)))
    order = (["day DESC"] if "day" in by else []) + (["cost_usd DESC", "total_tokens DESC"] if query.get("usd")
                                                      else ["total_tokens DESC"])
    return sql + " ORDER BY " + ", ".join(order), params


# The dollars of `clrk spend`, summed so that every store gives the same number for the same calls (a float
# sum depends on the order the engine adds in): whole micro-dollars are summed as integers, exactly; only
# what is left of each cost below a micro-dollar is summed as floats, and that sum is too small to tip the
# total's last bit. A single call's cost comes back exactly as recorded.
_COST = q(A.GEN_AI_USAGE_COST)
COST_PARTS_DUCKDB = (f"coalesce(sum(CAST(floor({_COST} * 1e6) AS BIGINT)), 0) AS _cost_micros",
                     f"coalesce(sum({_COST} - floor({_COST} * 1e6) / 1e6), 0) AS _cost_rest")


def exact_cost(row: dict) -> dict:
    """`cost_usd` from the two parts of `COST_PARTS_*` (which leave the row)."""
    micros, rest = row.pop("_cost_micros"), row.pop("_cost_rest")
    row["cost_usd"] = int(micros) / 1e6 + float(rest)
    return row


def fetch_spend(cur: duckdb.DuckDBPyConnection, query: Mapping) -> list[dict]:
    sql, params = spend_sql(query)
    res = cur.execute(sql, params)
    names = [d[0] for d in res.description]
    return [exact_cost({k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in zip(names, row, strict=True)})
            for row in res.fetchall()]


def fetch_budgets(cur: duckdb.DuckDBPyConnection, since: float) -> list[dict]:
    """Each budget pool's tokens and dollars charged since `since` and its latest known daily maximums."""
    pool, tokens, mx, t = q(A.CLRK_BUDGET_POOL), q(A.CLRK_BUDGET_TOKENS), q(A.CLRK_BUDGET_DAILY_MAX), q(A.TIME)
    cost, mc = q(A.CLRK_BUDGET_COST), q(A.CLRK_BUDGET_DAILY_MAX_COST)
    rows = cur.execute(
        f"SELECT {pool}, coalesce(sum({tokens}), 0), arg_max({mx}, {t}), coalesce(sum({cost}), 0), arg_max({mc}, {t}) "
        f"FROM {TABLE} WHERE {t} >= to_timestamp(?) AND {pool} IS NOT NULL GROUP BY 1 ORDER BY 1",
        [since],
    ).fetchall()
    return [{"pool": p, "used_tokens": int(u), "max_tokens": m, "left_tokens": None if m is None else max(0, m - int(u)),
             "used_usd": float(uc), "max_usd": c, "left_usd": None if c is None else max(0.0, c - float(uc))}
            for p, u, m, uc, c in rows]


def budget_totals(cur: duckdb.DuckDBPyConnection, since: float) -> dict[str, int]:
    """Tokens charged per budget pool since `since` (epoch seconds)."""
    rows = cur.execute(
        f"SELECT {q(A.CLRK_BUDGET_POOL)}, sum({q(A.CLRK_BUDGET_TOKENS)}) FROM {TABLE} "
        f"WHERE {q(A.TIME)} >= to_timestamp(?) AND {q(A.CLRK_BUDGET_POOL)} IS NOT NULL GROUP BY 1",
        [since],
    ).fetchall()
    return {pool: int(total or 0) for pool, total in rows}


def budget_cost_totals(cur: duckdb.DuckDBPyConnection, since: float) -> dict[str, float]:
    """Dollars charged per budget pool since `since` (epoch seconds)."""
    rows = cur.execute(
        f"SELECT {q(A.CLRK_BUDGET_POOL)}, sum({q(A.CLRK_BUDGET_COST)}) FROM {TABLE} "
        f"WHERE {q(A.TIME)} >= to_timestamp(?) AND {q(A.CLRK_BUDGET_POOL)} IS NOT NULL "
        f"AND {q(A.CLRK_BUDGET_COST)} IS NOT NULL GROUP BY 1",
        [since],
    ).fetchall()
    return {pool: float(total or 0) for pool, total in rows}


def open_readonly(path: str | Path, wait: float = 5.0) -> duckdb.DuckDBPyConnection:
    """A read-only connection, for when no recorder is running. A recorder that is just stopping still holds
    the file for a moment (its last flush): that is waited for, up to `wait` seconds."""
    if not Path(path).exists():
        raise StoreError(f"{path}: no store yet (the gateway creates it on first run)")
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException as e:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise StoreError(
                f"{path} is locked by a process that does not answer on the recorder socket: {e}. "
                "Is an older clrk gateway running?"
            ) from e

