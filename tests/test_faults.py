"""Faults: nothing lost, nothing stuck. Upstream TLS failures, an OTLP endpoint that fails then recovers,
a gateway killed with SIGKILL under load."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from clrk import attributes as A
from tests.harness.certs import make_upstream_pki
from tests.harness.dns import NxDomainServer, resolver_wrapper
from tests.harness.gateway import Gateway, agent_docs, gateway_doc, route
from tests.harness.otlp import OtlpReceiver
from tests.harness.upstream import FakeUpstream
from tests.harness.util import new_invocation, wait_for


def test_an_upstream_with_an_untrusted_certificate_is_a_clean_502_with_error_type(tmp_path, pki, upstream):
    rogue_pki = make_upstream_pki(tmp_path / "rogue", ["allowed.test"])  # signed by a CA nobody trusts
    rogue = FakeUpstream(rogue_pki[1])
    try:
        docs = [gateway_doc(aliases={"allowed.test": rogue.address}, ca_bundle=str(pki[0])), *agent_docs(), route("r", ["allowed.test"])]
        gw = Gateway(tmp_path / "gw", docs).start()
        try:
            i = new_invocation()
            with gw.client() as c:
                r = c.get("https://allowed.test/json/x", headers={"clrk-invocation-id": i})
            assert r.status_code == 502 and r.json() == {"error": "clrk: upstream allowed.test:443: tls_error"}
            rec = gw.wait_record(invocation=i)
            assert rec[A.ERROR_TYPE] == "tls_error" and rec[A.CLRK_DECISION] == "allow"
            assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 502  # what the agent received
            assert not rogue.requests  # the handshake failed: no request was sent to it
        finally:
            gw.stop()
    finally:
        rogue.close()


class FlakyOtlp(OtlpReceiver):
    """An OTLP endpoint that answers `status` until told to recover."""

    def __init__(self, status: int):
        super().__init__()
        self.status = status
        self.failed_posts = 0
        outer = self
        base = self.server.RequestHandlerClass

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_POST(self):
                if outer.status != 200:
                    self.rfile.read(int(self.headers.get("content-length") or 0))
                    outer.failed_posts += 1
                    self.send_response(outer.status)
                    if outer.status == 429:
                        self.send_header("retry-after", "1")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                super().do_POST()

        self.server.RequestHandlerClass = Handler


@pytest.mark.parametrize("status", [500, 429, 400])
def test_a_failing_otlp_endpoint_loses_no_row_and_export_resumes(tmp_path, pki, upstream, status):
    otlp = FlakyOtlp(status)
    docs = [gateway_doc(endpoint=otlp.endpoint, aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0])),
            *agent_docs(), route("r", ["allowed.test"])]
    gw = Gateway(tmp_path, docs).start()
    try:
        during, after = new_invocation(), new_invocation()
        with gw.client() as c:
            assert [c.get(f"https://allowed.test/json/{n}", headers={"clrk-invocation-id": during}).status_code for n in range(20)] == [200] * 20
        deadline = time.monotonic() + 10
        while otlp.failed_posts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert otlp.failed_posts > 0, "the endpoint was never tried"
        # all 20 stored (waited for: the proxy ships its records every 50 ms, and the failed export can come first)
        assert len(gw.wait_records(20, invocation=during)) == 20
        otlp.status = 200
        with gw.client() as c:
            c.get("https://allowed.test/json/later", headers={"clrk-invocation-id": after})
        rec = gw.wait_record(invocation=after)
        assert otlp.span(rec[A.SPAN_ID], timeout=30)["attributes"][A.INVOCATION_ID] == after
    finally:
        gw.stop()
        otlp.close()


def test_sigkill_under_load_loses_at_most_the_last_second(tmp_path, pki, upstream):
    docs = [gateway_doc(aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0])), *agent_docs(), route("r", ["allowed.test"])]
    gw = Gateway(tmp_path, docs).start()
    i = new_invocation()
    completed: list[float] = []
    stop = threading.Event()

    def load():
        with gw.client() as c:
            n = 0
            while not stop.is_set():
                try:
                    c.get(f"https://allowed.test/json/{n}", headers={"clrk-invocation-id": i})
                    completed.append(time.time())
                except Exception:
                    return
                n += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    # Under load until what the test counts on exists: more than 50 answers given over a second before the kill.
    wait_for(lambda: sum(t < time.time() - 1.0 for t in list(completed)) > 50, "51 answers older than a second",
             timeout=30, interval=0.1)
    killed_at = time.time()
    gw.proc.send_signal(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    gw.stop()  # waits for the orphaned recorder to flush and let go of the file
    rows = gw.records(invocation=i)
    must_have = [t for t in completed if t < killed_at - 1.0]
    assert len(rows) >= len(must_have) > 50, (len(rows), len(must_have), len(completed))


def test_a_full_disk_keeps_the_gateway_serving_and_the_records_waiting(tmp_path, pki, upstream):
    import subprocess
    import sys

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        docs = [gateway_doc(aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0])), *agent_docs(), route("r", ["allowed.test"])]
        gw = Gateway(tmp_path / "gw", docs)
        gw.db = mnt / "clrk.duckdb"
        gw.start()
        try:
            i = new_invocation()
            with gw.client() as c:
                c.get("https://allowed.test/json/first", headers={"clrk-invocation-id": i})
            gw.wait_record(invocation=i)
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # fill the disk to the last byte
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            with gw.client() as c:
                statuses = [c.get(f"https://allowed.test/json/{n}", headers={"clrk-invocation-id": i}).status_code for n in range(30)]
            assert statuses == [200] * 30  # the gateway keeps proxying
            clrk = str(Path(sys.executable).parent / "clrk")
            deadline = time.monotonic() + 10
            while "cannot be written" not in (st := subprocess.run([clrk, "status", "--db", str(gw.db)], capture_output=True, text=True).stdout):
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            assert "cannot write to" in gw.log()  # said loudly
            filler.unlink()  # space again: the waiting records are written
            deadline = time.monotonic() + 15
            while len(gw.records(invocation=i)) < 31:
                assert time.monotonic() < deadline, "the waiting records were not written once the disk had room"
                time.sleep(0.2)
            assert "records that waited are stored" in gw.log()
        finally:
            gw.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_hanging_endpoint_fills_a_bounded_queue_that_counts_its_drops(tmp_path, pki, upstream):
    """The export queue is bounded; what it drops is counted and shown; the store still has every record."""
    import json
    import subprocess
    import sys

    from tests.test_lifecycle import HangingEndpoint

    hang = HangingEndpoint()
    docs = [gateway_doc(endpoint=hang.endpoint, aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0])),
            *agent_docs(), route("r", ["allowed.test"])]
    gw = Gateway(tmp_path, docs, env={"CLRK_OTLP_QUEUE_SIZE": "20"}).start()
    try:
        i = new_invocation()
        with gw.client() as c:
            assert [c.get(f"https://allowed.test/json/{n}", headers={"clrk-invocation-id": i}).status_code for n in range(120)] == [200] * 120
        clrk = str(Path(sys.executable).parent / "clrk")
        deadline = time.monotonic() + 10
        while (st := json.loads(subprocess.run([clrk, "status", "--db", str(gw.db), "--json"], capture_output=True, text=True,
                                               check=True).stdout))["export_dropped"] == 0:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["export_dropped"] > 0 and st["dropped"] == 0
        gw.wait_records(120, invocation=i)  # the last records may reach the store after the status that counted drops
    finally:
        gw.stop()
        hang.close()


def test_an_upstream_that_never_answers_is_a_504_after_the_idle_timeout(tmp_path, pki, upstream):
    """mitmproxy's tcp_timeout (600 s by default, 2 s here) ends an upstream that went silent: the agent gets
    clrk's 504 instead of waiting forever, and the transaction is recorded with error.type timeout."""
    import httpx

    release = threading.Event()

    def silent(h, seen):
        release.wait(30)  # the scenario: an upstream that takes the request and never answers (past tcp_timeout)

    upstream.handlers["silent"] = silent
    docs = [gateway_doc(aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0])), *agent_docs(), route("r", ["allowed.test"])]
    gw = Gateway(tmp_path, docs, mitmproxy_args=["--set", "tcp_timeout=2"]).start()
    try:
        i = new_invocation()
        t0 = time.monotonic()
        with gw.client() as c:
            r = c.get("https://allowed.test/handler/silent", headers={"clrk-invocation-id": i})
        assert r.status_code == 504 and r.json() == {"error": "clrk: upstream allowed.test:443: timeout"}
        assert time.monotonic() - t0 < 6
        rec = gw.wait_record(invocation=i)
        assert rec[A.ERROR_TYPE] == "timeout" and rec[A.CLRK_DURATION_MS] >= 1900
        assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 504
        assert "Upstream silent for 2 s" in gw.log()
        # An agent that gives up by itself before that is not an upstream timeout.
        i = new_invocation()
        with httpx.Client(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, timeout=0.5) as c:
            with pytest.raises(httpx.HTTPError):
                c.get("https://allowed.test/handler/silent", headers={"clrk-invocation-id": i})
        assert gw.wait_record(invocation=i)[A.ERROR_TYPE] == "client_disconnected"
    finally:
        release.set()
        gw.stop()


@pytest.mark.parametrize("rcode", [3, 2], ids=["nxdomain", "servfail"])
def test_an_upstream_name_that_does_not_resolve_is_a_clean_502_with_dns_error(tmp_path, pki, rcode):
    """The gateway resolves through a DNS server on loopback that says the name does not exist (or fails):
    real resolver, real getaddrinfo, nothing sent off the machine. The agent gets a 502 at once and the
    record says dns_error."""
    try:
        dns = NxDomainServer(rcode=rcode)
    except OSError as e:
        pytest.skip(f"cannot bind a DNS server on loopback port 53: {e}")
    try:
        wrapper = resolver_wrapper(tmp_path, dns.host)
        if wrapper is None:
            pytest.skip("no mount namespace to give the gateway its own resolv.conf")
        docs = [gateway_doc(aliases={}, ca_bundle=str(pki[0])), *agent_docs(), route("r", ["missing.example.test"])]
        gw = Gateway(tmp_path / "gw", docs, wrapper=wrapper).start()
        try:
            i = new_invocation()
            t0 = time.monotonic()
            with gw.client() as c:
                r = c.get("https://missing.example.test/json/x", headers={"clrk-invocation-id": i})
            assert r.status_code == 502 and time.monotonic() - t0 < 10
            assert r.json() == {"error": "clrk: upstream missing.example.test:443: dns_error"} and "server" not in r.headers
            rec = gw.wait_record(invocation=i)
            assert (rec[A.ERROR_TYPE], rec[A.CLRK_DECISION]) == ("dns_error", "allow")
            assert rec[A.HTTP_RESPONSE_STATUS_CODE] == 502  # what the agent received: the gateway's answer
            assert "missing.example.test" in dns.queries  # it was asked, and said no
        finally:
            gw.stop()
    finally:
        dns.close()


def test_records_encoded_one_by_one_frame_as_one_rows_message():
    """The proxy encodes each record when it is made and frames a batch without decoding: the recorder must
    read exactly the message it would have got from encoding the batch whole (also past 65,535 records,
    where msgpack's array header changes size)."""
    from clrk import wire

    for records in ([], [{"a": 1, "b": [1, (2, 3)], "c": b"\x00bytes", "d": None, "e": "ünïcode"}],
                    [{"i": i} for i in range(70_000)]):
        framed = wire.pack_rows([wire.pack_record(r) for r in records])
        assert framed == wire.pack({"t": "rows", "rows": records})



# The proxy's record encoder (ormsgpack, with msgpack where it refuses) against msgpack's packer alone: the same
# bytes for everything, or the same error. Snapshots hold str keys, tuples, bytes and scalars; the rest is what
# a bug or a hostile value could put there.
def _odd_values():
    import collections
    import dataclasses
    import datetime
    import enum
    import uuid

    from hypothesis import strategies as st

    class Colour(enum.Enum):
        RED = 1

    class Level(enum.IntEnum):
        HIGH = 2

    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int = 1

    pair = collections.namedtuple("pair", "a b")
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.binary(max_size=40),
        st.text(max_size=40), st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
        st.binary(max_size=20).map(bytearray), st.sampled_from([Colour.RED, Level.HIGH, Point(), uuid.UUID(int=7),
                                                                 datetime.datetime(2026, 1, 1), pair(1, "b")]))
    keys = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.binary(max_size=4), st.sampled_from(
        [None, 1.5, Colour.RED, Level.HIGH, datetime.date(2026, 1, 1), uuid.UUID(int=1), (1, 2)]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


def _msgpack_alone(value):
    import msgpack

    try:
        return msgpack.Packer(use_bin_type=True).pack(value)
    except Exception as e:
        return type(e)


def test_records_are_encoded_as_msgpack_encodes_them():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from clrk import wire

    @given(value=st.dictionaries(st.text(max_size=12), _odd_values(), max_size=6))
    @settings(max_examples=1500, deadline=None)
    def check(value):
        try:
            got = wire.pack_record(value)
        except Exception as e:
            got = type(e)
        assert got == _msgpack_alone(value)

    check()
    deep: list = []
    for _ in range(400):  # past ormsgpack's depth, within msgpack's
        deep = [deep]
    assert wire.pack_record({"d": deep}) == _msgpack_alone({"d": deep})
