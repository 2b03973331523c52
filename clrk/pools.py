"""Budget pools held in memory: the ADMIT and SETTLE steps of the shared budget ledger (the Lua scripts of
`clrk.proxy.budget_store`), in Python, for the recorder, which holds the ledger when `clrk_budget_store` is
`recorder` (every proxy process of one store shares it).

Same keys, same arguments (the strings a proxy would send to Redis), same replies, same state — down to the
text Redis keeps: a pool's day is a hash of strings (`u`, `r` integers; `uc`, `rc` dollars as HINCRBYFLOAT
writes them: the sum in x87 80-bit long double, printed "%.17Lf" with trailing zeros cut), numbers are
compared as Lua does (doubles), keys expire at their EXPIREAT (and at once when it is past), and an
operation that Redis would refuse raises `PoolError` after the same writes Redis would have made before it.
tests/test_pools.py runs random sequences against both and compares every reply and the final state.

Pure: no I/O, no mitmproxy; the recorder calls it on its event loop (a few dict operations per call; the
long-double arithmetic only for pools with a dollar limit).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from fractions import Fraction

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
LD_MANTISSA = 64  # bits of an x86-64 long double, the type of Redis's HINCRBYFLOAT arithmetic
MARK_TTL = 172800  # an applied mark's EX (SETTLE)
PREFIX = "clrk:budget:"
KEEP_AFTER_DAY = 3600  # a pool's day is kept this long after the day ends (late settlements)

_INT = re.compile(r"-?(0|[1-9][0-9]{0,18})\Z")
_FLOAT = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,3})?\Z")


class PoolError(Exception):
    """What Redis would answer with an error (the arguments or the stored value do not fit)."""


# ---------------------------------------------------------------------------------------------- arguments

def _is_int(s: object) -> bool:
    return isinstance(s, str) and _INT.match(s) is not None and INT64_MIN <= int(s) <= INT64_MAX


def _is_float(s: object, *, empty: bool = False) -> bool:
    if not isinstance(s, str):
        return False
    if s == "":
        return empty
    if _FLOAT.match(s) is None:
        return False
    v = float(s)
    return v == v and abs(v) != float("inf")


def _is_amount(v: object) -> bool:
    """A number of dollars sent as a number: finite, not negative (NaN fails both compares)."""
    return type(v) in (int, float) and 0 <= v < 1e300  # type: ignore[operator]


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key.startswith(PREFIX) or len(key) > 4096 or key.count(":") < 3:
        raise PoolError("not a budget pool key")
    return key


def check_admit(args: object) -> tuple[str, ...]:
    """ADMIT's arguments as a proxy sends them, or PoolError: max tokens ("" = none), tokens, max USD ("" =
    none), USD, expire-at."""
    if not isinstance(args, (list, tuple)) or len(args) != 5:
        raise PoolError("ADMIT takes 5 arguments")
    mx, tokens, mc, cost, exp = args
    if not ((mx == "" or _is_int(mx)) and _is_int(tokens) and int(tokens) >= 0 and _is_float(mc, empty=True)
            and _is_float(cost) and float(cost) >= 0 and _is_int(exp)):
        raise PoolError("ADMIT: malformed arguments")
    return tuple(args)


def check_settle(args: object) -> tuple[str, ...]:
    """SETTLE's arguments: tokens and USD released, tokens and USD charged, expire-at, settlement number — as
    strings (what Redis takes), or, from a proxy of this gateway, the amounts and the number as numbers (no
    text made per call there): returned as the strings the proxy would have sent Redis."""
    if not isinstance(args, (list, tuple)) or len(args) != 6:
        raise PoolError("SETTLE takes 6 arguments")
    r, rc, u, uc, exp, n = args
    if type(n) is int:
        if not (type(r) is int and 0 <= r <= INT64_MAX and type(u) is int and 0 <= u <= INT64_MAX
                and _is_amount(rc) and _is_amount(uc) and 0 < n <= INT64_MAX and _is_int(exp)):
            raise PoolError("SETTLE: malformed arguments")
        return str(r), repr(float(rc)) if rc > 0 else "0", str(u), repr(float(uc)) if uc > 0 else "0", exp, str(n)
    if not (_is_int(r) and int(r) >= 0 and _is_float(rc) and float(rc) >= 0 and _is_int(u) and int(u) >= 0
            and _is_float(uc) and float(uc) >= 0 and _is_int(exp) and _is_int(n)):
        raise PoolError("SETTLE: malformed arguments")
    return tuple(args)


# ---------------------------------------------------------------------------------------------- long double

def _ld(x: Fraction) -> Fraction:
    """`x` rounded to the nearest long double (64-bit mantissa, ties to even), as strtold and + do."""
    if x == 0:
        return Fraction(0)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    shift = LD_MANTISSA - 1 - e  # a * 2**shift is in [2**63, 2**64)
    m = round(a * Fraction(2) ** shift)
    v = Fraction(m) / Fraction(2) ** shift
    return v if x > 0 else -v


def ld_text(x: Fraction) -> str:
    """`x` as Redis prints a long double for humans: "%.17Lf", trailing zeros (and a bare point) cut, "-0"
    as "0"."""
    q = round(x * 10**17)  # glibc rounds the exact value, ties to even; Fraction's round does too
    neg = q < 0 or (q == 0 and x < 0)
    digits = str(abs(q)).rjust(18, "0")
    text = (digits[:-17] + "." + digits[-17:]).rstrip("0").rstrip(".")
    if neg and text != "0":
        return "-" + text
    return "0" if text in ("-0", "0") else text


def _parse_ld(s: str) -> Fraction:
    try:
        return _ld(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise PoolError("hash value is not a float") from None


# ---------------------------------------------------------------------------------------------- the pools

class Pools:
    """Budget pool days (hashes of strings, with EXPIREAT) and the applied marks of ledgers."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.hashes: dict[str, dict[str, str]] = {}
        self.expires: dict[str, int] = {}  # key -> EXPIREAT (unix seconds)
        self.marks: dict[str, tuple[str, float]] = {}  # mark key -> (value, expires at)

    # the Redis commands the scripts use, on strings

    def _hash(self, key: str) -> dict[str, str] | None:
        h = self.hashes.get(key)
        if h is not None:
            t = self.expires.get(key)
            if t is not None and self.clock() > t:
                self._delete(key)
                return None
        return h

    def _delete(self, key: str) -> None:
        self.hashes.pop(key, None)
        self.expires.pop(key, None)

    def hmget(self, key: str, *fields: str) -> list[str | None]:
        h = self._hash(key) or {}
        return [h.get(f) for f in fields]

    def _write(self, key: str) -> dict[str, str]:
        h = self._hash(key)
        if h is None:
            h = self.hashes[key] = {}
        return h

    def hincrby(self, key: str, field: str, incr: str) -> int:
        if not _is_int(incr):
            raise PoolError("value is not an integer or out of range")
        by = int(incr)
        h = self._write(key)
        old = h.get(field)
        if old is not None and not _is_int(old):
            raise PoolError("hash value is not an integer")
        value = int(old) if old is not None else 0
        if (by < 0 and value < 0 and by < INT64_MIN - value) or (by > 0 and value > 0 and by > INT64_MAX - value):
            raise PoolError("increment or decrement would overflow")
        value += by
        h[field] = str(value)
        return value

    def hincrbyfloat(self, key: str, field: str, incr: str) -> str:
        if not _is_float(incr):
            raise PoolError("value is not a valid float")
        by = _parse_ld(incr)
        h = self._write(key)
        old = h.get(field)
        value = _ld((_parse_ld(old) if old is not None else Fraction(0)) + by)
        text = ld_text(value)
        h[field] = text
        return text

    def hdel(self, key: str, field: str) -> None:
        h = self._hash(key)
        if h is not None:
            h.pop(field, None)
            if not h:
                self._delete(key)

    def hset(self, key: str, field: str, value: str) -> None:
        self._write(key)[field] = value

    def expireat(self, key: str, at: str) -> None:
        if self._hash(key) is None:
            return
        t = int(at)
        if t * 1000 <= self.clock() * 1000:  # a time already past deletes the key
            self._delete(key)
        else:
            self.expires[key] = t

    def get_mark(self, mark: str) -> str | None:
        v = self.marks.get(mark)
        if v is None:
            return None
        if self.clock() > v[1]:
            del self.marks[mark]
            return None
        return v[0]

    # the scripts

    def admit(self, key: str, args: tuple[str, ...]) -> list:
        """ADMIT: [1, u, uc] (the usage before it) when the reservation fits, [0, u, r, uc, rc] when not."""
        v = self.hmget(key, "u", "r", "uc", "rc")
        u, r = _num(v[0]), _num(v[1])
        uc, rc = _num(v[2]), _num(v[3])
        no = [0, v[0] or "0", v[1] or "0", v[2] or "0", v[3] or "0"]
        if args[0] != "" and u + r + float(args[1]) > float(args[0]):
            return no
        if args[2] != "" and uc + rc + float(args[3]) > float(args[2]):
            return no
        self.hincrby(key, "r", args[1])
        if args[2] != "":
            self.hincrbyfloat(key, "rc", args[3])
        self.expireat(key, args[4])
        return [1, v[0] or "0", v[2] or "0"]

    def settle(self, key: str, mark: str, args: tuple[str, ...]) -> list:
        """SETTLE: releases args[0] tokens and args[1] USD, charges args[2] tokens and args[3] USD, once per
        settlement number (args[5]) of the ledger whose applied mark is `mark`. Returns [u, uc] after it."""
        n = float(args[5])
        if n <= _num(self.get_mark(mark)):
            v = self.hmget(key, "u", "uc")
            return [v[0] or "0", v[1] or "0"]
        self.marks[mark] = (args[5], self.clock() + MARK_TTL)
        self.release(key, args[0], args[1])
        if args[2] != "0":
            if _num(self.hmget(key, "u")[0]) + float(args[2]) >= 9.2e18:
                self.hset(key, "u", str(INT64_MAX))
            else:
                self.hincrby(key, "u", args[2])
        if args[3] != "0":
            self.hincrbyfloat(key, "uc", args[3])
        self.expireat(key, args[4])
        v = self.hmget(key, "u", "uc")
        return [v[0] or "0", v[1] or "0"]

    def release(self, key: str, tokens: str, usd: str) -> None:
        """SETTLE's release of a reservation (tokens, USD as its arguments), on its own: what the recorder
        does for a proxy that died holding reservations."""
        if tokens != "0" and self.hincrby(key, "r", "-" + tokens) <= 0:
            self.hdel(key, "r")
        if usd != "0" and _num(self.hincrbyfloat(key, "rc", "-" + usd)) <= 1e-12:
            self.hdel(key, "rc")

    def charge(self, key: str, tokens: int, usd: float, at: str) -> None:
        """Adds usage read from the store (a recorder seeding a day): SETTLE's charge, without a mark."""
        if tokens > 0:
            if _num(self.hmget(key, "u")[0]) + float(tokens) >= 9.2e18:
                self.hset(key, "u", str(INT64_MAX))
            else:
                self.hincrby(key, "u", str(tokens))
        if usd > 0:
            self.hincrbyfloat(key, "uc", repr(float(usd)))
        self.expireat(key, at)

    def sweep(self) -> None:
        """Forgets what has expired (Redis does it in the background; here, when the recorder asks)."""
        now = self.clock()
        for key in [k for k, t in self.expires.items() if now > t]:
            self._delete(key)
        for mark in [m for m, (_, t) in self.marks.items() if now > t]:
            del self.marks[mark]

    def state(self) -> dict[str, dict[str, str]]:
        """Every live pool day: key -> its fields."""
        self.sweep()
        return {k: dict(h) for k, h in self.hashes.items()}


def _num(s: str | None) -> float:
    """Lua's `tonumber(s) or 0` on what a hash holds."""
    if s is None:
        return 0.0
    try:
        return float(s)
    except ValueError:
        return 0.0


def pool_key(day: str, pool: str) -> str:
    return f"{PREFIX}{day}:{pool}"


def key_day(key: str) -> str:
    """The UTC day (YYYY-MM-DD) of a pool key."""
    return key[len(PREFIX):].split(":", 1)[0]


def day_expiry(day: str) -> str:
    """EXPIREAT of a pool's day (YYYY-MM-DD): KEEP_AFTER_DAY after it ends, as text (a script argument)."""
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()
    return str(int(start) + 86400 + KEEP_AFTER_DAY)
