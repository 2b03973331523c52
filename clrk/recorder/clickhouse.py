"""Records on ClickHouse: the store of a fleet, where every gateway's recorder writes the same table.

The table has the columns of `clrk.attributes.COLUMNS` under the same names, in types every ClickHouse from
18.16 on accepts (the SQL here is checked against a current engine, chdb, and an old server in the tests):

    VARCHAR, JSON  -> Nullable(String)         BIGINT  -> Nullable(Int64)     INTEGER -> Nullable(Int32)
    DOUBLE         -> Nullable(Float64)        BOOLEAN -> Nullable(UInt8)     VARCHAR[] -> Array(String)
    TIMESTAMPTZ    -> Int64 microseconds since the epoch, UTC (`time` not nullable: it orders the table)

`ENGINE = MergeTree PARTITION BY` the UTC day `ORDER BY (_agent, time)`, `_agent` being a materialized
`namespace/name` (not returned by `SELECT *`); `ttl_days=N` in the URL adds a TTL (ClickHouse 19.6+).
Attributes added to clrk later become columns on the next start (`ADD COLUMN`).

Values are never spliced into SQL unescaped: inserts travel in the drivers' binary formats (chdb: JSON
lines), and filter values in queries are written as literals by `lit`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import struct
import threading
import time
from collections.abc import Mapping

from clrk import attributes as A
from clrk import storeref
from clrk.recorder.store import SEQ, StoreError, exact_cost, records_sql, storable

log = logging.getLogger("clrk.recorder")
# The driver logs every failed connect with a traceback: at each retry of an outage, that would be five a
# second. The recorder says what failed itself, once in a while (service.py), and `clrk status` always.
logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)

_CH_TYPES = {
    "VARCHAR": "Nullable(String)",
    "JSON": "Nullable(String)",
    "BIGINT": "Nullable(Int64)",
    "INTEGER": "Nullable(Int32)",
    "BOOLEAN": "Nullable(UInt8)",
    "DOUBLE": "Nullable(Float64)",
    "TIMESTAMPTZ": "Nullable(Int64)",
    "VARCHAR[]": "Array(String)",
}
COLUMNS: dict[str, str] = {name: _CH_TYPES[t] for name, t in A.COLUMNS.items()}
COLUMNS[A.TIME] = "Int64"
COLUMNS[SEQ] = "Int64"
NAMES = tuple(COLUMNS)
_TIME = frozenset(k for k, t in A.COLUMNS.items() if t == "TIMESTAMPTZ")
_JSON = frozenset(k for k, t in A.COLUMNS.items() if t == "JSON")
_BOOL = frozenset(k for k, t in A.COLUMNS.items() if t == "BOOLEAN")
_ARRAY = frozenset(k for k, t in A.COLUMNS.items() if t == "VARCHAR[]")
_INT_BOUNDS = {k: ((-(2**31), 2**31 - 1) if t == "INTEGER" else (-(2**63), 2**63 - 1))
               for k, t in A.COLUMNS.items() if t in ("INTEGER", "BIGINT")}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
US_PER_DAY = 86_400_000_000


def q(name: str) -> str:
    """A quoted identifier (attribute names contain dots)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def lit(value) -> str:
    """A value as a ClickHouse literal: strings with every quote and backslash escaped, and the characters
    that could end or confuse a literal (NUL, newlines) as escapes."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, dt.datetime):
        return str(to_us(value))
    s = str(value)
    s = (s.replace("\\", "\\\\").replace("'", "\\'").replace("\0", "\\0").replace("\n", "\\n")
         .replace("\r", "\\r").replace("\t", "\\t"))
    return "'" + s + "'"


def to_us(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


def from_us(us: int) -> str:
    """Microseconds since the epoch as the RFC 3339 UTC text the DuckDB store gives for the same instant."""
    return (_EPOCH + dt.timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")


def inline(sql: str, params: list) -> str:
    """DuckDB-style `?` placeholders filled with ClickHouse literals (the filter SQL of `records_sql` is
    shared by both stores; its identifiers hold no `?`)."""
    parts = sql.split("?")
    if len(parts) != len(params) + 1:
        raise ValueError("placeholders and values do not match")
    out = [parts[0]]
    for p, rest in zip(params, parts[1:], strict=True):
        out += [lit(p), rest]
    return "".join(out)


def row_tuple(r: Mapping) -> tuple:
    """A record dict as the table's row (NAMES order)."""
    out = []
    for k in NAMES:
        v = r.get(k)
        if v is None:
            out.append([] if k in _ARRAY else None)
        elif k in _TIME:
            out.append(int(v * 1_000_000))  # as the DuckDB store (truncated to the microsecond)
        elif k in _JSON and not isinstance(v, str):
            out.append(json.dumps(v, separators=(",", ":")))
        elif k in _BOOL:
            out.append(1 if v else 0)
        else:
            bounds = _INT_BOUNDS.get(k)
            if bounds is not None and not (bounds[0] <= v <= bounds[1]):  # one answer for every engine and driver
                raise OverflowError(f"{k}: {v} does not fit its column")
            out.append(v)
    return tuple(out)


def record_from_row(names: list[str], row, keep_seq: bool = False) -> dict:
    """A table row as the JSON-ready record `clrk.recorder.store.fetch_records` gives for DuckDB."""
    rec = {}
    for k, v in zip(names, row, strict=True):
        if v is None or (k == SEQ and not keep_seq):
            continue
        if k in _TIME:
            v = from_us(int(v))
        elif k in _BOOL:
            v = bool(v)
        elif k in _JSON and isinstance(v, str):
            v = json.loads(v)
        elif k in _ARRAY:
            if not v:
                continue
            v = list(v)
        rec[k] = v
    return rec


def _encodable(t: tuple) -> None:
    for v in t:
        if isinstance(v, str):
            v.encode()
        elif isinstance(v, list):
            for x in v:
                x.encode()


# --------------------------------------------------------------------------- SQL (checked against chdb)


def ddl(database: str, table: str, ttl_days: int | None) -> list[str]:
    cols = ", ".join(f"{q(n)} {t}" for n, t in COLUMNS.items())
    agent = f"concat(ifNull({q(A.AGENT_NAMESPACE)}, ''), '/', ifNull({q(A.AGENT_NAME)}, ''))"
    create = (f"CREATE TABLE IF NOT EXISTS {database}.{table} ({cols}, `_agent` String MATERIALIZED {agent}) "
              f"ENGINE = MergeTree PARTITION BY intDiv({q(A.TIME)}, {US_PER_DAY}) ORDER BY (`_agent`, {q(A.TIME)})")
    if ttl_days:
        create += " " + ttl_clause(ttl_days)
    return [f"CREATE DATABASE IF NOT EXISTS {database}", create]


def ttl_clause(days: int) -> str:
    return f"TTL toDateTime(intDiv({q(A.TIME)}, 1000000)) + toIntervalDay({int(days)})"


def ch_records_sql(table: str, query: Mapping) -> str:
    """`clrk records` / `clrk tail` on ClickHouse: the DuckDB store's filters, values as literals."""
    sql, params = records_sql(query)
    sql = sql.replace('"', "`")  # DuckDB quotes identifiers with ", ClickHouse accepts ` everywhere
    return inline(sql.replace("FROM records", f"FROM {table}", 1), params)


def _agent_expr() -> str:
    # NULL when either part is (as DuckDB's ||), so "unknown agent" rows group together in both stores
    ns, name = q(A.AGENT_NAMESPACE), q(A.AGENT_NAME)
    return f"if(isNull({ns}) OR isNull({name}), NULL, concat(assumeNotNull({ns}), '/', assumeNotNull({name})))"


def _route_expr() -> str:
    ns, name = q(A.CLRK_APR_NAMESPACE), q(A.CLRK_APR_NAME)
    return f"if(isNull({ns}) OR isNull({name}), NULL, concat(assumeNotNull({ns}), '/', assumeNotNull({name})))"


SPEND_DIMENSIONS = {
    "day": f"intDiv({q(A.TIME)}, {US_PER_DAY})",  # the UTC day's number; `spend` turns it into its date
    "agent": _agent_expr(),
    "route": _route_expr(),
    "model": q(A.GEN_AI_REQUEST_MODEL),
}


def ch_spend_sql(table: str, query: Mapping) -> str:
    """`clrk spend` on ClickHouse; the same groups, sums and order as `clrk.recorder.store.spend_sql`."""
    from clrk.recorder.store import SPEND_DIMENSIONS as DUCK_DIMENSIONS
    from clrk.recorder.store import parse_since

    by = [d for d in (query.get("by") or list(DUCK_DIMENSIONS)) if d in SPEND_DIMENSIONS]
    cols = [f"{SPEND_DIMENSIONS[d]} AS {d}" for d in by]
    inp, out, cost = q(A.GEN_AI_USAGE_INPUT_TOKENS), q(A.GEN_AI_USAGE_OUTPUT_TOKENS), q(A.GEN_AI_USAGE_COST)
    cols += [
        "count() AS requests",
        f"toInt64(ifNull(sum({inp}), 0)) AS input_tokens",
        f"toInt64(ifNull(sum({out}), 0)) AS output_tokens",
        f"toInt64(ifNull(sum(ifNull({inp}, 0) + ifNull({out}, 0)), 0)) AS total_tokens",
        f"countIf(ifNull({q(A.CLRK_BUDGET_DENIED)}, 0) = 1) AS budget_denied",
        f"toFloat64(ifNull(sum({q(A.GEN_AI_USAGE_COST)}), 0)) AS cost_usd",
        f"countIf(ifNull({q(A.CLRK_COST_SOURCE)}, '') = 'unknown') AS unpriced",
        f"toInt64(ifNull(sum(toInt64(floor({cost} * 1e6))), 0)) AS _cost_micros",
        f"toFloat64(ifNull(sum({cost} - floor({cost} * 1e6) / 1e6), 0)) AS _cost_rest",
    ]
    where = [f"{q(A.GEN_AI_SYSTEM)} IS NOT NULL"]
    if query.get("since"):
        where.append(f"{q(A.TIME)} >= {lit(parse_since(str(query['since'])))}")
    for key in ("agent", "route", "model"):
        if query.get(key):
            where.append(f"{SPEND_DIMENSIONS[key]} = {lit(str(query[key]))}")
    sql = f"SELECT {', '.join(cols)} FROM {table} WHERE {' AND '.join(where)}"
    if by:
        sql += " GROUP BY " + ", ".join(by)
    order = (["day DESC"] if "day" in by else []) + (["cost_usd DESC", "total_tokens DESC"] if query.get("usd")
                                                      else ["total_tokens DESC"])
    return sql + " ORDER BY " + ", ".join(order)


def ch_budgets_sql(table: str, since: float) -> str:
    pool, tokens, mx, t = q(A.CLRK_BUDGET_POOL), q(A.CLRK_BUDGET_TOKENS), q(A.CLRK_BUDGET_DAILY_MAX), q(A.TIME)
    cost, mc = q(A.CLRK_BUDGET_COST), q(A.CLRK_BUDGET_DAILY_MAX_COST)
    return (f"SELECT {pool} AS pool, toInt64(ifNull(sum({tokens}), 0)) AS used, argMax({mx}, {t}) AS mx, "
            f"toFloat64(ifNull(sum({cost}), 0)) AS used_cost, argMax({mc}, {t}) AS mc FROM {table} "
            f"WHERE {t} >= {int(since * 1_000_000)} AND {pool} IS NOT NULL GROUP BY pool ORDER BY pool")


def ch_totals_sql(table: str, since: float) -> str:
    pool, t = q(A.CLRK_BUDGET_POOL), q(A.TIME)
    return (f"SELECT {pool} AS pool, toInt64(ifNull(sum({q(A.CLRK_BUDGET_TOKENS)}), 0)) AS tokens, "
            f"sum({q(A.CLRK_BUDGET_COST)}) AS cost FROM {table} "
            f"WHERE {t} >= {int(since * 1_000_000)} AND {pool} IS NOT NULL GROUP BY pool")


def spend_rows(names: list[str], rows) -> list[dict]:
    out = []
    for row in rows:
        r = dict(zip(names, row, strict=True))
        if "day" in r and r["day"] is not None:
            r["day"] = (_EPOCH + dt.timedelta(days=int(r["day"]))).date().isoformat()
        for k in ("requests", "input_tokens", "output_tokens", "total_tokens", "budget_denied", "unpriced"):
            r[k] = int(r[k])
        out.append(exact_cost(r))  # the same dollars as the DuckDB store's, to the last bit
    return out


# --------------------------------------------------------------------------- connections


class _Native:
    """clickhouse-driver, the native protocol (port 9000)."""

    def __init__(self, t: storeref.ClickHouseTarget):
        from clickhouse_driver import Client

        self.client = Client(host=t.host, port=t.port, user=t.user, password=t.password, database="default",
                             secure=t.secure, connect_timeout=min(t.timeout, 5), send_receive_timeout=t.timeout,
                             sync_request_timeout=t.timeout, settings={"strings_as_bytes": False})

    def query(self, sql: str) -> tuple[list[str], list]:
        rows, types = self.client.execute(sql, with_column_types=True)
        return [n for n, _ in types], rows

    def command(self, sql: str) -> None:
        self.client.execute(sql)

    def insert(self, table: str, rows: list[tuple]) -> None:
        self.client.execute(f"INSERT INTO {table} ({', '.join(q(n) for n in NAMES)}) VALUES", rows)

    def close(self) -> None:
        self.client.disconnect()


class _Http:
    """The HTTP interface (port 8123, or 8443 with TLS), spoken with the standard library: JSON lines in,
    JSONCompact out, which every ClickHouse release accepts (clickhouse-connect cannot talk to the old
    ones: its handshake reads settings columns they lack). The credentials travel in headers, never in
    the URL (which the server logs)."""

    def __init__(self, t: storeref.ClickHouseTarget):
        import base64
        import http.client
        import ssl

        self.t = t
        cls = http.client.HTTPSConnection if t.secure else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if t.secure else {}
        self.conn = cls(t.host, t.port, timeout=t.timeout, **kw)
        auth = base64.b64encode(f"{t.user}:{t.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {auth}", "Content-Type": "text/plain; charset=utf-8"}
        self.query("SELECT 1")  # the server is there and lets us in

    def _post(self, params: dict, body: bytes) -> bytes:
        from urllib.parse import urlencode

        self.conn.request("POST", "/?" + urlencode({"database": "default", **params}), body=body, headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise StoreError(f"HTTP {resp.status}: {data.decode(errors='replace').strip()[:300]}")
        return data

    def query(self, sql: str) -> tuple[list[str], list]:
        data = self._post({"output_format_json_quote_64bit_integers": "0"}, (sql + " FORMAT JSONCompact").encode())
        if not data.strip():
            return [], []
        doc = json.loads(data)
        return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]

    def command(self, sql: str) -> None:
        self._post({}, sql.encode())

    def insert(self, table: str, rows: list[tuple]) -> None:
        body = "\n".join(json.dumps(dict(zip(NAMES, r, strict=True)), ensure_ascii=False) for r in rows).encode()
        self._post({"query": f"INSERT INTO {table} ({', '.join(q(n) for n in NAMES)}) FORMAT JSONEachRow"}, body)

    def close(self) -> None:
        self.conn.close()


class Chdb:
    """The embedded engine (chdb): today's ClickHouse in-process, for checking this module's SQL."""

    def __init__(self, path: str | None = None):
        from chdb import session

        self.session = session.Session(path) if path else session.Session()

    def query(self, sql: str) -> tuple[list[str], list]:
        res = self.session.query(sql + " SETTINGS output_format_json_quote_64bit_integers = 0", "JSONCompact")
        text = res.bytes() if hasattr(res, "bytes") else bytes(res)
        if not text.strip():
            return [], []
        doc = json.loads(text)
        return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]

    def command(self, sql: str) -> None:
        self.session.query(sql)

    def insert(self, table: str, rows: list[tuple]) -> None:
        # UTF-8 text, as the drivers send it (and as they refuse what is not)
        lines = "\n".join(json.dumps(dict(zip(NAMES, r, strict=True)), ensure_ascii=False) for r in rows).encode()
        head = f"INSERT INTO {table} ({', '.join(q(n) for n in NAMES)}) FORMAT JSONEachRow\n"
        self.session.query(head + lines.decode())

    def close(self) -> None:
        self.session.close()


def connect(t: storeref.ClickHouseTarget):
    try:
        return _Native(t) if t.protocol == "native" else _Http(t)
    except ImportError as e:
        raise StoreError("records on ClickHouse need its Python drivers: pip install 'clrk[fleet]'") from e


# --------------------------------------------------------------------------- the store


class ClickHouseStore:
    """The recorder's ClickHouse store: the same methods as `clrk.recorder.store.Store`.

    Unlike a DuckDB file, the server may be away when the recorder starts or at any time after: nothing
    here fails the recorder for that. The connection is made, and the table created or migrated, on first
    use and again after any failure; the recorder keeps what could not be written and retries."""

    def __init__(self, url: str, conn=None):
        self.url = url
        self.target = storeref.ClickHouseTarget(url)
        self.name = storeref.display(url)
        self.table = f"{self.target.database}.{self.target.table}"
        self._lock = threading.Lock()
        self._conn = self._given = conn
        self._ready = False
        self._uncertain = False  # an INSERT failed: whether it was written is not known
        self.next_seq = time.time_ns() // 1000  # `_seq`: ingestion order across recorders (microseconds)
        if conn is not None:
            self._prepare()

    def error_text(self, e: BaseException) -> str:
        """What the recorder shows of a failure: one line, without the server's stack trace, no password."""
        text = " ".join(str(e).split("Stack trace:", 1)[0].split()) or type(e).__name__
        return storeref.scrub(f"{type(e).__name__}: {text}"[:400], self.url)

    def _c(self):
        if self._conn is None:
            self._conn = connect(self.target)
        if not self._ready:
            self._prepare()
        return self._conn

    def _prepare(self) -> None:
        conn = self._conn
        for stmt in ddl(self.target.database, self.target.table, self.target.ttl_days):
            try:
                conn.command(stmt)
            except Exception as e:
                if self.target.ttl_days and "TTL" in str(e).upper() and stmt.startswith("CREATE TABLE"):
                    raise StoreError(f"{self.name}: this ClickHouse does not accept a TTL (ttl_days needs "
                                     f"ClickHouse 19.6 or later): {self.error_text(e)}") from e
                raise
        have = self._columns()
        for name, typ in COLUMNS.items():
            if name not in have:
                try:  # (no IF NOT EXISTS: the old releases lack it)
                    conn.command(f"ALTER TABLE {self.table} ADD COLUMN {q(name)} {typ}")
                except Exception:
                    if name not in self._columns():  # else another recorder of the fleet added it first
                        raise
        if self.target.ttl_days:  # changed only when it differs: a new TTL makes the server rewrite the parts
            _, rows = conn.query(f"SELECT create_table_query FROM system.tables WHERE database = "
                                 f"{lit(self.target.database)} AND name = {lit(self.target.table)}")
            if not rows or f"toIntervalDay({self.target.ttl_days})" not in rows[0][0]:
                conn.command(f"ALTER TABLE {self.table} MODIFY {ttl_clause(self.target.ttl_days)}")
        self._ready = True

    def _drop_connection(self) -> None:
        if self._given is not None:  # an engine handed in (chdb in the tests) is kept
            self._ready = False
            return
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn, self._ready = None, False

    def _columns(self) -> set[str]:
        _, rows = self._conn.query(f"SELECT name FROM system.columns WHERE database = {lit(self.target.database)} "
                                   f"AND table = {lit(self.target.table)}")
        return {r[0] for r in rows}

    def reopen(self) -> None:
        """A fresh connection after a failure."""
        with self._lock:
            self._drop_connection()
            self._c()

    def insert(self, rows: list[Mapping]) -> list[Mapping]:
        """Inserts a batch in one INSERT; returns the rows written. Each row keeps the `_seq` it was first
        given, so a batch retried after a failure lands in the order it was received."""
        if not rows:
            return rows
        self.stamp(rows)
        try:
            tuples = [row_tuple(r) for r in rows]
        except (TypeError, ValueError, OverflowError):  # a value that fits no column: not the whole batch
            rows, tuples = self._mend(rows)
        with self._lock:
            try:
                if self._uncertain:  # the last INSERT failed after it was sent: it may have been written
                    rows, tuples = self._not_yet_written(rows, tuples)
                if tuples:
                    self._c().insert(self.table, tuples)
            except (TypeError, ValueError, OverflowError, struct.error):  # the driver refused a value, not the server
                self._drop_connection()  # it may have sent part of the batch: start clean
                rows, tuples = self._mend_by_driver(rows)
                self._insert_or_doubt(tuples)
            except Exception:
                self._uncertain = True
                self._drop_connection()
                raise
            self._uncertain = False
        return rows

    def _insert_or_doubt(self, tuples: list[tuple]) -> None:
        try:
            self._c().insert(self.table, tuples)
        except Exception:
            self._uncertain = True
            self._drop_connection()
            raise

    def _not_yet_written(self, rows: list[Mapping], tuples: list[tuple]) -> tuple[list[Mapping], list[tuple]]:
        """The rows of a retried batch the server does not have yet. An INSERT whose answer was lost (the
        connection cut as the server wrote it) may have landed; each row's (`_seq`, `span_id`) tells, so a
        retry writes the rest only: nothing twice. One range query, on the first retry after a failure."""
        seqs = [r[SEQ] for r in rows]
        _, found = self._c().query(
            f"SELECT {q(SEQ)}, {q(A.SPAN_ID)} FROM {self.table} WHERE {q(SEQ)} BETWEEN {min(seqs)} AND {max(seqs)}")
        if not found:
            return rows, tuples
        have = {(int(s), sp) for s, sp in found}
        keep = [k for k, r in enumerate(rows) if (r[SEQ], r.get(A.SPAN_ID)) not in have]
        log.warning("%s: %d records of a batch whose answer was lost were written already; not again",
                    self.name, len(rows) - len(keep))
        return [rows[k] for k in keep], [tuples[k] for k in keep]

    def stamp(self, rows: list[Mapping]) -> None:
        """Gives each row its `_seq` once: the first time the recorder tries to write it, so a row that waits
        (in memory or the spool, across recorders) keeps its place in the order."""
        # microseconds of ingestion, so the recorders of a fleet interleave by when they stored a row
        self.next_seq = max(self.next_seq, time.time_ns() // 1000)
        for r in rows:
            if SEQ not in r:
                r[SEQ] = self.next_seq  # type: ignore[index]
                self.next_seq += 1

    @staticmethod
    def _mend(rows: list[Mapping]) -> tuple[list[Mapping], list[tuple]]:
        """Each row as it can be stored (`storable`), keeping its `_seq`."""
        kept, tuples = [], []
        for r in rows:
            try:
                tuples.append(row_tuple(r))
                kept.append(r)
                continue
            except (TypeError, ValueError, OverflowError):
                pass
            for fixed in storable([r]):
                fixed[SEQ] = r[SEQ]
                tuples.append(row_tuple(fixed))
                kept.append(fixed)
        return kept, tuples

    def _mend_by_driver(self, rows: list[Mapping]) -> tuple[list[Mapping], list[tuple]]:
        """The rows again, those with a value the driver cannot encode (text that is not UTF-8; records are
        escaped, so this is a guard) through `storable`, which leaves such values out and says so."""
        kept, tuples = [], []
        for r in rows:
            t = row_tuple(r)
            try:
                _encodable(t)
                kept.append(r)
                tuples.append(t)
            except UnicodeEncodeError:
                for fixed in storable([r]):
                    fixed[SEQ] = r[SEQ]
                    kept.append(fixed)
                    tuples.append(row_tuple(fixed))
        return kept, tuples

    def _query(self, sql: str) -> tuple[list[str], list]:
        with self._lock:
            try:
                return self._c().query(sql)
            except Exception as e:
                self._drop_connection()
                text = str(e) if isinstance(e, StoreError) and str(e).startswith(self.name) else \
                    f"{self.name}: {self.error_text(e)}"
                raise StoreError(storeref.scrub(text, self.url)) from e

    def records(self, query: Mapping) -> list[dict]:
        names, rows = self._query(ch_records_sql(self.table, query))
        keep = query.get("after_seq") is not None
        return [record_from_row(names, r, keep) for r in rows]

    def spend(self, query: Mapping) -> list[dict]:
        return spend_rows(*self._query(ch_spend_sql(self.table, query)))

    def budgets(self, since: float) -> list[dict]:
        _, rows = self._query(ch_budgets_sql(self.table, since))
        return [{"pool": p, "used_tokens": int(u), "max_tokens": m,
                 "left_tokens": None if m is None else max(0, m - int(u)),
                 "used_usd": float(uc), "max_usd": c, "left_usd": None if c is None else max(0.0, c - float(uc))}
                for p, u, m, uc, c in rows]

    def totals(self, since: float) -> tuple[dict[str, int], dict[str, float]]:
        _, rows = self._query(ch_totals_sql(self.table, since))
        return ({p: int(t or 0) for p, t, _ in rows}, {p: float(c) for p, _, c in rows if c is not None})

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:
                    pass
