"""The DuckDB store's batch INSERT (one list parameter per column) against the Arrow insert it replaced: the
same rows stored the same, to the value; values of another type still go the Arrow way (`storable`); and a
recorder's ordinary batches never import pyarrow (nor the pandas it loads): ~80 MB of its memory."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from clrk import attributes as A
from clrk.recorder import store as S
from clrk.recorder.expand import expand
from clrk.redact import Redactor
from tests.test_otlp_wire import raw, rows_of_every_kind

REPO = Path(__file__).resolve().parent.parent


def arrow_insert(store: S.Store, rows: list[dict]) -> list[dict]:
    """What `Store.insert` did before: the batch as one Arrow table, or row by row through `storable`."""
    seq = store.next_seq
    try:
        table = S.to_arrow(rows, seq)
    except Exception:
        rows = S.storable(rows)
        table = S.to_arrow(rows, seq)
    store.next_seq = seq + len(rows)
    cur = store.cursor()
    cur.register("clrk_batch", table)
    cur.execute(f"INSERT INTO {S.TABLE} BY NAME SELECT * FROM clrk_batch")
    cur.close()
    return rows


def table(store: S.Store) -> list[tuple]:
    return store.con.execute(f"SELECT * FROM {S.TABLE} ORDER BY {S.q(S.SEQ)}").fetchall()


def same_values(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for va, vb in zip(ra, rb, strict=True):
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb)
            else:
                assert (va, type(va)) == (vb, type(vb))


def every_value_rows() -> list[dict]:
    rows = rows_of_every_kind()
    red = Redactor()
    rows.append(expand(raw(ids=("6af7651916cd43dd8448eb211c80319c", "b8ad6b7169203331", None),
                           ws=(3, 4, 1000, "client", "bye"), l4=12345, incomplete="proxy: cut short",
                           budget_cost=(10.0, 0.25, 0.000125)), red))
    # edge values each column type takes
    rows.append({**rows[0], A.SPAN_ID: "0000000000000002", A.CLRK_DURATION_MS: float("nan"), A.GEN_AI_USAGE_COST: 0,
                 A.CLRK_BUDGET_TOKENS: 2**63 - 1, A.SERVER_PORT: 2**31 - 1, A.URL_FULL: "https://x/\x00é😀",
                 A.CLRK_RECORD_ESCAPED: [], A.REQUEST_HEADERS: {}, A.RESPONSE_HEADERS: '{"pre":"made"}',
                 A.TIME: 1_765_000_000, A.END_TIME: 0.000001})
    return rows


@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_the_same_rows_are_stored_the_same_as_through_arrow(tmp_path, tz):
    rows = every_value_rows()
    new, old = S.Store(tmp_path / "new.duckdb"), S.Store(tmp_path / "old.duckdb")
    for st in (new, old):
        st.con.execute(f"SET TimeZone = '{tz}'")
    assert S.columns(rows, 1) is not None  # the fast way takes them all
    assert new.insert(rows) == rows
    assert arrow_insert(old, rows) == rows
    assert new.insert(rows[:3]) == rows[:3] and arrow_insert(old, rows[:3]) == rows[:3]  # _seq goes on
    same_values(table(new), table(old))
    assert new.next_seq == old.next_seq == len(rows) + 3 + 1
    headers = new.con.execute(f"SELECT {S.q(A.REQUEST_HEADERS)} FROM {S.TABLE} ORDER BY {S.q(S.SEQ)} LIMIT 1").fetchone()[0]
    assert json.loads(headers)["authorization"] != "Bearer ghp_secret"  # redacted once, stored so


@pytest.mark.parametrize("key,value", [
    (A.HTTP_RESPONSE_STATUS_CODE, 99999999999), (A.HTTP_RESPONSE_STATUS_CODE, True), (A.CLRK_BUDGET_TOKENS, 2**64),
    (A.SERVER_ADDRESS, 5), (A.GEN_AI_USAGE_COST, 2**60 + 1), (A.GEN_AI_USAGE_COST, "1.5"), (A.CLRK_RECORD_ESCAPED, ["a", 1]),
    (A.CLRK_RECORD_ESCAPED, ("a",)), (A.END_TIME, float("inf")), (A.END_TIME, 1e300), (A.REQUEST_HEADERS, {"a": {1, 2}}),
    (A.CLRK_BUDGET_DENIED, 1),
])
def test_a_value_of_another_type_is_stored_or_left_out_as_through_arrow(tmp_path, key, value):
    rows = every_value_rows()[:3]
    rows[1] = {**rows[1], key: value}
    new, old = S.Store(tmp_path / "new.duckdb"), S.Store(tmp_path / "old.duckdb")
    assert S.columns(rows, 1) is None or key == A.END_TIME
    assert [r[A.SPAN_ID] for r in new.insert(rows)] == [r[A.SPAN_ID] for r in arrow_insert(old, rows)]
    same_values(table(new), table(old))


def test_ordinary_batches_import_no_pyarrow_and_no_pandas(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "bench")!r})
from recorder_cpu import snapshots
from clrk.recorder.expand import expand
from clrk.recorder.store import Store
from clrk.redact import Redactor
st = Store({str(tmp_path / "c.duckdb")!r})
rows = [expand(r, Redactor()) for r in snapshots(2000, 3)]
for i in range(0, len(rows), 512):
    assert len(st.insert(rows[i:i + 512])) == len(rows[i:i + 512])
assert st.con.execute("SELECT count(*) FROM records").fetchone()[0] == 2000
print(sorted(m for m in ("pyarrow", "pandas", "numpy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_header_json_is_the_text_json_writes():
    """Headers are written through orjson where its text is json's: every ASCII character (DEL and the controls
    included), non-ASCII, a lone surrogate, keys that are not str, and values that are not str."""
    values = [{chr(c) + "k": "v" + chr(c)} for c in range(0x80)] + [
        {"\u00e9": "\u00fc"}, {"a": "\U0001f600"}, {"a": "\ud800"}, {"\udcff": "a"}, {1: "a"}, {None: "a"},
        {"a": 1e-7}, {"a": 2**70}, {"a": float("inf")}, {"a": {"b": "c"}}, {"a": None}, {"a": True}, {}, ["a"],
        {"a": "b", "c": "d\x7f"}, {"content-type": "application/json", "x-request-id": "abc", "(clrk)": "1 more"},
    ]
    for v in values:
        assert S._json_text(v) == json.dumps(v, separators=(",", ":")), v


_POOL = [None, "a", "", 0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**53, 2**53 + 1, -(2**53) - 1,
         2**63 - 1, 2**63, -(2**63), -(2**63) - 1, True, False, 0.5, -0.0, float("nan"), float("inf"), [], ["a", None],
         ["a", 1], [b"a"], ("a",), {"a": "b"}, b"x", 1_765_000_000.25]


@pytest.mark.parametrize("typ", sorted(set(A.COLUMNS.values())))
def test_a_column_is_taken_whole_exactly_when_each_of_its_values_fits(typ):
    """The whole-column type check against the value-by-value one (`_fits`) it stands for: random columns of
    values of every kind, with the type's edges."""
    key = next(k for k, t in A.COLUMNS.items() if t == typ)
    rng = random.Random(typ)
    for _ in range(3000):
        vals = rng.choices(_POOL, k=rng.randint(1, 5))
        fits = all(v is None or S._fits(typ, v) for v in vals)
        if fits and typ == "JSON":  # and json can write it
            try:
                [json.dumps(v) for v in vals]
            except TypeError:
                fits = False
        assert (S.columns([{key: v} for v in vals], 1) is not None) == fits, vals


def test_a_value_every_row_shares_is_one_scalar_parameter_and_stored_the_same(tmp_path):
    """A column whose batch values are all equal goes as one scalar: stored as the list gave it, for every column
    type and its edge values, mixed with None (then a list), with 1 and True, 0 and -0.0 (DOUBLE: a list)."""
    base = every_value_rows()[0]
    new, old = S.Store(tmp_path / "new.duckdb"), S.Store(tmp_path / "old.duckdb")
    rng = random.Random(7)
    scalars = 0
    for key, typ in sorted(A.COLUMNS.items()):
        if typ == "TIMESTAMPTZ" or key in (A.TRACE_ID, A.SPAN_ID):
            continue
        for _ in range(8):
            pool = rng.sample(_POOL, 2)
            n = rng.choice((1, 2, 5))
            vals = [pool[0]] * n if rng.random() < 0.6 else rng.choices(pool, k=n)
            rows = [{**base, A.SPAN_ID: f"{rng.getrandbits(64):016x}", key: v} for v in vals]
            batch = S.columns(rows, new.next_seq)
            if batch is not None and any(f" AS {S.q(key)}" in e and not e.startswith("unnest")
                                         for e in batch[0].split(" SELECT ", 1)[1].split(", ")):
                scalars += 1
                assert typ != "DOUBLE" and len({(type(v), repr(v)) for v in vals}) == 1, vals
            got = []
            for st, ins in ((new, S.Store.insert), (old, arrow_insert)):
                try:
                    got.append([r[A.SPAN_ID] for r in ins(st, rows)])
                except duckdb.Error as e:  # text that is no JSON in a JSON column: refused both ways
                    got.append(type(e))
            assert got[0] == got[1], (key, vals)
    same_values(table(new), table(old))
    assert scalars > 50
    # the bench's batches: the gateway, component and scheme-like columns go once
    sql, params = S.columns([{**base, A.SPAN_ID: f"{i:016x}"} for i in range(4)], 1)
    assert f"?::VARCHAR AS {S.q(A.CLRK_GATEWAY_NAME)}" in sql and base[A.CLRK_GATEWAY_NAME] in params
