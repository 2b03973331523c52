"""clrk/pools.py, the recorder's copy of the shared ledger's Lua scripts: random operation sequences run
against the real scripts on a real redis-server and against the Python module give the same reply to every
call (errors included) and leave the same state (every hash field's text, every expiry, every applied mark).
Then what the module adds of its own (release, charge, the arguments a hostile peer may send)."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clrk.pools import INT64_MAX, PoolError, Pools, check_admit, check_settle, ld_text, pool_key
from clrk.proxy.budget_store import ADMIT, SETTLE
from tests.harness.redis_server import RedisServer

KEYS = ["clrk:budget:2026-01-01:a", "clrk:budget:2026-01-01:b/agent:x"]
MARKS = ["clrk:budget:applied:one", "clrk:budget:applied:two"]
FUTURE = str(int(time.time()) + 10 * 86400)
PAST = "1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


def floats():
    """Dollar amounts as a proxy writes them (repr of a float): decimals that do not add up exactly in binary,
    tiny and subnormal ones, and big ones."""
    return st.one_of(
        st.sampled_from(["0.1", "0.2", "0.3", "0.75", "1e-09", "1e-12", "5e-324", "1.0", "0.30000000000000004"]),
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False).map(repr),
    )


def ints(high: int = 2000):
    return st.one_of(st.integers(0, high), st.integers(INT64_MAX - 2000, INT64_MAX), st.just(2**62)).map(str)


admit_op = st.tuples(st.just("admit"), st.sampled_from(KEYS), st.tuples(
    st.one_of(st.just(""), ints()), ints(600), st.one_of(st.just(""), floats()), floats(),
    st.sampled_from([FUTURE, FUTURE, PAST])))
settle_op = st.tuples(st.just("settle"), st.sampled_from(KEYS), st.tuples(
    st.one_of(st.just("0"), ints(600)), st.one_of(st.just("0"), floats()), st.one_of(st.just("0"), ints(3000)),
    st.one_of(st.just("0"), floats()), st.sampled_from([FUTURE, FUTURE, PAST]), st.integers(-1, 12).map(str)),
    st.sampled_from(MARKS))
ops = st.lists(st.one_of(admit_op, settle_op), min_size=1, max_size=30)


def _call(fn):
    try:
        return fn()
    except (PoolError, redis.ResponseError):
        return "error"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops)
def test_the_module_answers_as_the_lua_scripts_do(server, seq):
    r = redis.Redis.from_url(server.url, decode_responses=True)
    r.flushdb()
    admit, settle = r.register_script(ADMIT), r.register_script(SETTLE)
    pools = Pools()
    for op in seq:
        if op[0] == "admit":
            _, key, args = op
            want = _call(lambda k=key, a=args: admit(keys=[k], args=list(a)))
            got = _call(lambda k=key, a=args: pools.admit(k, a))
        else:
            _, key, args, mark = op
            want = _call(lambda k=key, m=mark, a=args: settle(keys=[k, m], args=list(a)))
            got = _call(lambda k=key, m=mark, a=args: pools.settle(k, m, a))
        assert got == want, (op, pools.hashes)
    for key in KEYS:
        assert pools.state().get(key, {}) == r.hgetall(key), key
        assert (pools.expires.get(key, -1) if key in pools.hashes else -2) == r.expiretime(key), key
    for mark in MARKS:
        assert pools.get_mark(mark) == r.get(mark)
    r.close()


def test_dollars_are_kept_as_redis_prints_them():
    p = Pools()
    assert p.hincrbyfloat(KEYS[0], "rc", "0.1") == "0.1"
    assert p.hincrbyfloat(KEYS[0], "rc", "0.2") == "0.3"  # long double: not 0.30000000000000004
    assert p.hincrbyfloat(KEYS[0], "rc", "-0.3") == "0"
    assert ld_text(Fraction(-1, 10**20)) == "0"
    assert p.hincrbyfloat(KEYS[1], "uc", "1e-09") == "0.000000001"


def test_release_and_charge_are_settles_parts():
    p = Pools()
    assert p.admit(KEYS[0], ("100", "60", "1.0", "0.5", FUTURE)) == [1, "0", "0"]
    p.release(KEYS[0], "60", "0.5")
    assert p.state() == {}  # nothing held, nothing used: the key is gone, as in Redis
    p.charge(KEYS[0], 40, 0.25, FUTURE)
    p.charge(KEYS[0], INT64_MAX, 0.0, FUTURE)
    assert p.state()[KEYS[0]] == {"u": str(INT64_MAX), "uc": "0.25"}
    assert p.expires[KEYS[0]] == int(FUTURE)


def test_a_day_past_its_expiry_is_gone():
    clock = [1000.0]
    p = Pools(clock=lambda: clock[0])
    p.admit(KEYS[0], ("", "5", "", "0.0", "2000"))
    p.settle(KEYS[0], MARKS[0], ("0", "0", "0", "0", "2000", "1"))
    assert p.hmget(KEYS[0], "r") == ["5"]
    clock[0] = 2000.5
    assert p.hmget(KEYS[0], "r") == [None]
    clock[0] = 1000.0 + 172801
    p.sweep()
    assert p.marks == {} and p.hashes == {}


@pytest.mark.parametrize("args", [
    None, "x", [], ["", "1", "", "0.0"], ["", "1", "", "0.0", FUTURE, "extra"], ["", "-1", "", "0.0", FUTURE],
    ["", "1", "", "nan", FUTURE], ["", "1", "inf", "0.0", FUTURE], ["", "1", "", "-0.5", FUTURE],
    ["", 1, "", "0.0", FUTURE], ["", "1" * 30, "", "0.0", FUTURE], ["", "1", "", "0.0", "0x10"],
    ["", " 1", "", "0.0", FUTURE], [b"", "1", "", "0.0", FUTURE], ["", "1", "", "1e999", FUTURE],
])
def test_malformed_admit_arguments_are_refused(args):
    with pytest.raises(PoolError):
        check_admit(args)


@pytest.mark.parametrize("args", [
    None, ["0", "0", "0", "0", FUTURE], ["-5", "0", "0", "0", FUTURE, "1"], ["0", "0", "0", "0", FUTURE, "1.5"],
    ["0", "0", "9" * 20, "0", FUTURE, "1"], ["0", "0", "0", "0", FUTURE, {"n": 1}],
])
def test_malformed_settle_arguments_are_refused(args):
    with pytest.raises(PoolError):
        check_settle(args)


def test_what_a_proxy_sends_is_accepted():
    assert check_admit(["", "1", "5.0", "1e-09", FUTURE])
    assert check_settle(["60", "0.75", "10", "0.125", FUTURE, "1"])


@pytest.mark.parametrize("seed", range(5))
def test_settlements_summed_into_one_leave_the_pool_day_as_one_by_one(seed):
    """What the proxy's queue relies on to send one item per pool day: SETTLE of the sums (numbered once)
    leaves tokens exactly, and dollars to their last digits, as the settlements one after another."""
    rnd = random.Random(seed)
    exp = str(int(time.time()) + 86400)
    one, summed = Pools(), Pools()
    k = pool_key("2026-01-01", "p")
    for p in (one, summed):
        p.admit(k, ("", str(10**6), "", "0", exp))
        p.hincrbyfloat(k, "rc", "5.5")
    calls = [(rnd.randrange(0, 5000), rnd.choice([0.0, rnd.random() / 7]), rnd.randrange(0, 9000),
              rnd.choice([0.0, rnd.random() / 3])) for _ in range(rnd.randrange(1, 40))]
    for n, (r, rc, u, uc) in enumerate(calls, 1):
        one.settle(k, "m", (str(r), repr(rc) if rc else "0", str(u), repr(uc) if uc else "0", exp, str(n)))
    sums = [sum(c[i] for c in calls) for i in range(4)]
    summed.settle(k, "m", (str(sums[0]), repr(sums[1]) if sums[1] else "0", str(sums[2]),
                           repr(sums[3]) if sums[3] else "0", exp, str(len(calls))))
    a, b = one.state().get(k, {}), summed.state().get(k, {})
    assert {f: a.get(f) for f in ("u", "r")} == {f: b.get(f) for f in ("u", "r")}
    for f in ("uc", "rc"):
        assert float(a.get(f, 0)) == pytest.approx(float(b.get(f, 0)), rel=1e-12, abs=1e-12)
