"""Gateway lifecycle: hot reload, a dead or hanging OTLP endpoint, the dev tee, graceful stop."""

from __future__ import annotations

import base64
import http.client
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clrk import attributes as A
from tests.harness.gateway import AGENT_TOKEN, REPO, Gateway, agent_docs, free_port, gateway_doc, route
from tests.harness.otlp import OtlpReceiver
from tests.harness.util import new_invocation, wait_for


def docs_for(pki, upstream, *routes, endpoint: str = "") -> list[dict]:
    aliases = {h: upstream.address for h in ("allowed.test", "api.github.com")}
    return [gateway_doc(endpoint=endpoint, aliases=aliases, ca_bundle=str(pki[0])), *agent_docs(), *routes]


class Tunnel:
    """One persistent client connection through the gateway (CONNECT + TLS + HTTP/1.1 keep-alive)."""

    def __init__(self, gw: Gateway, host: str):
        self.conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=gw.ssl_context(), timeout=10)
        auth = base64.b64encode(f"team-a.researcher:{AGENT_TOKEN}".encode()).decode()
        self.conn.set_tunnel(host, 443, headers={"Proxy-Authorization": f"Basic {auth}"})
        self.conn.connect()
        self.sock = self.conn.sock

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        body = r.read()
        assert self.conn.sock is self.sock, "the client connection was replaced"
        return r.status, body


def test_hot_reload_applies_within_a_second_and_a_bad_edit_keeps_the_last_good_policy(tmp_path, pki, upstream):
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["allowed.test"]))).start()
    try:
        t = Tunnel(gw, "api.github.com")
        assert t.get("/json/before")[0] == 403

        gw.write_policy(docs_for(pki, upstream, route("r1", ["allowed.test", "api.github.com"])))
        start = time.monotonic()
        while (status := t.get("/json/after")[0]) != 200 and time.monotonic() - start < 5:
            time.sleep(0.02)
        took = time.monotonic() - start
        assert status == 200
        assert took < 1.5, f"reload took {took:.2f}s"

        # A broken edit: logged with file, document and field; the last good policy stays in force.
        (gw.policies / "policy.yaml").write_text((gw.policies / "policy.yaml").read_text().replace("defaultPolicy: deny-all", "defaultPolicy: maybe"))
        gw.wait_log("policy reload failed", timeout=5)
        log = gw.log()
        assert "policy reload failed; the last good policy stays in force" in log
        assert "document 1 (EgressGateway test-gw): spec.defaultPolicy" in log
        assert t.get("/json/still-allowed")[0] == 200

        # Removing the route closes the door on the same open connection.
        gw.write_policy(docs_for(pki, upstream, route("r1", ["allowed.test"])))
        start = time.monotonic()
        while t.get("/json/closed")[0] != 403 and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert t.get("/json/closed")[0] == 403
        assert gw.proc.poll() is None
    finally:
        gw.stop()


def test_revoked_agent_loses_its_open_tunnel(tmp_path, pki, upstream):
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["api.github.com"]))).start()
    try:
        t = Tunnel(gw, "api.github.com")
        assert t.get("/json/a")[0] == 200
        docs = docs_for(pki, upstream, route("r1", ["api.github.com"]))
        docs[1]["spec"]["credentials"]["tokenSha256"] = "0" * 64  # rotate the researcher's token
        gw.write_policy(docs)
        start = time.monotonic()
        while (status := t.get("/json/b")[0]) == 200 and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert status == 407
    finally:
        gw.stop()


class HangingEndpoint:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("kind", ["refused", "hanging"])
def test_otlp_endpoint_down_never_fails_a_request_and_every_row_is_stored(tmp_path, pki, upstream, kind):
    hanging = HangingEndpoint() if kind == "hanging" else None
    endpoint = hanging.endpoint if hanging else f"http://127.0.0.1:{free_port()}"
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["allowed.test"]), endpoint=endpoint)).start()
    i = new_invocation()
    try:
        with gw.client() as c:
            statuses = [c.get(f"https://allowed.test/json/{n}", headers={"clrk-invocation-id": i}).status_code for n in range(40)]
        assert statuses == [200] * 40
        gw.wait_records(40, invocation=i)
    finally:
        rc = gw.stop()
        if hanging:
            hanging.close()
    assert rc == 0
    assert len(gw.records(invocation=i)) == 40


def test_dev_fallback_tees_without_replacing_the_gateway_endpoint(tmp_path, pki, upstream):
    own, tee = OtlpReceiver(), OtlpReceiver()
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["allowed.test"]), endpoint=own.endpoint), fallback=tee.endpoint).start()
    try:
        i = new_invocation()
        with gw.client() as c:
            assert c.get("https://allowed.test/json/tee", headers={"clrk-invocation-id": i}).status_code == 200
        rec = gw.wait_record(invocation=i)
        a, b = own.span(rec[A.SPAN_ID]), tee.span(rec[A.SPAN_ID])
        assert a == b
        assert own.log(rec[A.SPAN_ID])["attributes"] == tee.log(rec[A.SPAN_ID])["attributes"]
    finally:
        gw.stop()
        own.close()
        tee.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_loses_no_row(tmp_path, pki, upstream, sig):
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["allowed.test"]))).start()
    i = new_invocation()
    n = 300

    def worker(k: int) -> list[int]:
        with gw.client() as c:
            return [c.get(f"https://allowed.test/json/{k}-{j}", headers={"clrk-invocation-id": i}).status_code for j in range(n // 6)]

    with ThreadPoolExecutor(6) as ex:
        results = [s for r in ex.map(worker, range(6)) for s in r]
    assert results == [200] * n
    rc = gw.stop(sig)  # right after the last response: records are still in flight in the proxy's queue
    assert rc == 0
    rows = gw.records(invocation=i)  # the gateway is gone: this opens the file read-only
    assert len(rows) == n
    assert "records not stored" not in gw.log()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_sigterm_lets_a_stream_in_flight_finish_and_records_it(tmp_path, pki, upstream):
    gw = Gateway(tmp_path, docs_for(pki, upstream, route("r1", ["allowed.test"]))).start()
    i = new_invocation()
    got: list[bytes] = []
    upstream.sse_done.clear()
    with gw.client() as c, c.stream("GET", "https://allowed.test/sse?n=4&delay=0.7", headers={"clrk-invocation-id": i}) as r:
        it = r.iter_raw()
        got.append(next(it))
        gw.proc.send_signal(signal.SIGTERM)  # mid-stream
        gw.wait_log("SIGTERM: accepting no new connections")
        # No new connection is accepted while the stream drains (the listener closes just after that line)...
        wait_for(lambda: _refused(gw.port), "the gateway to refuse new connections", timeout=5)
        got.extend(it)
    body = b"".join(got)
    assert body.count(b"event: tick") == 4 and body.endswith(b"data: [DONE]\n\n")
    assert gw.proc.wait(30) == 0
    gw.stop()
    (rec,) = gw.records(invocation=i)
    assert rec[A.RESPONSE_BODY] == body.decode() and A.ERROR_TYPE not in rec
    assert "letting 1 transaction(s) in flight finish" in gw.log()


def test_mitmdump_script_entry_decides_and_records_like_clrk_run(tmp_path, pki, upstream):
    """The tests run the gateway as `clrk run` does (`python -O -m clrk.proxy`); `mitmdump -s addons/clrk.py`,
    the documented entry too, must behave the same."""
    gw = Gateway(tmp_path / "gw", docs_for(pki, upstream, route("allowed", ["allowed.test"])), entry="mitmdump").start()
    try:
        i = new_invocation()
        with gw.client() as c:
            assert c.get("https://allowed.test/json/entry", headers={"clrk-invocation-id": i}).status_code == 200
            denied = c.get("https://api.github.com/entry", headers={"clrk-invocation-id": i + "-d"})
        assert denied.status_code == 403 and denied.json()["error"].startswith("clrk: ")
        assert gw.wait_record(invocation=i)[A.CLRK_DECISION] == "allow"
        assert gw.wait_record(invocation=i + "-d")[A.CLRK_DECISION] == "deny"
    finally:
        gw.stop()
    assert gw.proc.args[0].endswith("mitmdump") and gw.proc.args[1:3] == ["-s", str(REPO / "addons" / "clrk.py")]


@pytest.mark.parametrize("entry", ["clrk", "mitmdump"])
def test_extra_mitmproxy_arguments_cannot_undo_what_clrk_relies_on(tmp_path, pki, upstream, forbidden_upstream, entry):
    """`clrk run -- <mitmdump args>`: `-v` (which turns mitmproxy's own flow log on, with unredacted URLs
    and headers) and `connection_strategy=eager` (which dials the CONNECT target before any decision) are
    overridden, whichever way the gateway is started."""
    docs = docs_for(pki, upstream, route("allowed", ["allowed.test"]))
    docs[0]["spec"]["upstreamTLS"]["hostAliases"]["denied.test"] = forbidden_upstream.address
    gw = Gateway(tmp_path / "gw", docs, entry=entry,
                 mitmproxy_args=["-v", "--set", "connection_strategy=eager", "--set", "flow_detail=3"]).start()
    try:
        with gw.client() as c:
            r = c.get("https://allowed.test/json/args?key=QUERYSECRET-77", headers={"authorization": "Bearer HDRSECRET-77"})
            assert r.status_code == 200
            assert c.get("https://denied.test/json/args").status_code == 403
    finally:
        gw.stop()
    assert forbidden_upstream.connections == 0
    log = gw.log()
    assert "QUERYSECRET-77" not in log and "HDRSECRET-77" not in log


@pytest.mark.parametrize("entry", ["clrk", "mitmdump"])
def test_an_invalid_policy_stops_the_gateway_at_start_with_a_clear_error(tmp_path, pki, upstream, entry):
    docs = docs_for(pki, upstream, route("allowed", ["allowed.test"], sourceAgents={"namespaces": "not-a-list"}))
    gw = Gateway(tmp_path / "gw", docs, entry=entry)
    with pytest.raises(RuntimeError, match="exited with 1"):
        gw.start()
    assert "is invalid" in gw.log() and "sourceAgents" in gw.log()


def test_clrk_hooks_run_before_a_user_script(tmp_path, pki, upstream):
    """`clrk run -- -s user.py`: clrk sees each request first (as with `mitmdump -s addons/clrk.py -s user.py`),
    so a user script cannot answer a request before clrk has authenticated, decided and recorded it."""
    seen = tmp_path / "seen.txt"
    script = tmp_path / "user.py"
    script.write_text(
        "class Seen:\n"
        "    def requestheaders(self, flow):\n"
        f"        open({str(seen)!r}, 'a').write('answered ' if flow.response else 'open ')\n"
        "addons = [Seen()]\n")
    gw = Gateway(tmp_path / "gw", docs_for(pki, upstream, route("allowed", ["allowed.test"])),
                 mitmproxy_args=["-s", str(script)]).start()
    try:
        with gw.client() as c:
            assert c.get("https://api.github.com/user-script").status_code == 403
    finally:
        gw.stop()
    assert seen.read_text().split() == ["answered"]
