"""`Gateway`, the one addon mitmproxy sees, runs clrk's steps each under its own guard: a step that raises is
logged and cannot skip the steps after it, and the last one (Failsafe) then denies the request rather than let
it leave without a decision. A step that has to wait returns an awaitable; the rest run after it, in order."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import subprocess
import sys

from mitmproxy import flow
from mitmproxy.test import tflow

from clrk.proxy import gateway as mitmaddon
from clrk.proxy.gateway import Gateway, run_steps
from clrk.proxy.steps.egress import EgressControl
from clrk.proxy.steps.providers import Providers
from clrk.proxy.transaction import METADATA_KEY
from tests.harness.util import compile_policy


def _policy(allow_host: str):
    docs = [
        {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}},
        {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-a"},
         "spec": {"credentials": {"tokenSha256": hashlib.sha256(b"tok").hexdigest()}}},
        {"kind": "EgressRoute", "metadata": {"name": "ok"}, "spec": {"hostnames": [allow_host]}},
    ]
    return compile_policy(*docs)


def _flow(host: str):
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.scheme = host, 443, "https"
    f.request.headers["host"] = host
    f.request.headers["proxy-authorization"] = "Basic " + base64.b64encode(b"team-a.bot:tok").decode()
    return f


def _gateway_with_broken(monkeypatch, step_class, hook: str, exc: Exception) -> Gateway:
    """A Gateway (on the policy allowing example.com) whose `step_class.hook` raises `exc`."""
    def broken(self, flow):
        raise exc

    monkeypatch.setattr(step_class, hook, broken)
    g = Gateway()
    g.rt.policy = _policy("example.com")
    return g


def test_an_allowed_request_passes_every_step():
    g = Gateway()
    g.rt.policy = _policy("example.com")
    f = _flow("example.com")
    assert g.requestheaders(f) is None and g.request(f) is None
    assert f.response is None
    assert f.metadata[METADATA_KEY].decision.allow


def test_a_recorded_transaction_is_taken_off_its_flow_and_recorded_once():
    """mitmproxy's flows are reference cycles, freed by the collector; the transaction leaves the flow once its
    record is made (so it is freed at once), and a later hook of that flow (an error after the response)
    records nothing twice."""
    g = Gateway()
    g.rt.policy = _policy("example.com")
    f = _flow("example.com")
    g.requestheaders(f)
    g.request(f)
    f.response = tflow.tresp()
    g.responseheaders(f)
    g.response(f)
    assert METADATA_KEY not in f.metadata and g.rt.in_flight == 0
    assert [r["decision"][0] for r in g.rt.unsent] == ["allow"]
    f.error = flow.Error("client disconnected")
    g.error(f)
    assert len(g.rt.unsent) == 1


def test_a_step_that_raises_is_logged_and_the_request_is_denied_not_let_through(monkeypatch, caplog):
    g = _gateway_with_broken(monkeypatch, EgressControl, "requestheaders", RuntimeError("decision step blew up"))
    f = _flow("example.com")
    with caplog.at_level(logging.ERROR, logger="clrk"):
        g.requestheaders(f)
    # The steps after the broken one still ran: Failsafe refused the request with the contract's JSON body.
    assert f.response is not None and f.response.status_code == 500
    assert "could not decide" in json.loads(f.response.content)["error"]
    assert any("EgressControl.requestheaders raised" in r.getMessage() for r in caplog.records)
    assert any("had no decision" in r.getMessage() for r in caplog.records)


def test_a_raising_step_in_the_body_hook_cannot_skip_the_failsafe_either(monkeypatch):
    g = _gateway_with_broken(monkeypatch, EgressControl, "request", ValueError("body step blew up"))
    f = _flow("example.com")
    assert g.requestheaders(f) is None and f.response is None
    # Simulate a decision that was left for the body (a provider call) and then never made.
    f.metadata[METADATA_KEY].decision = None
    g.request(f)
    assert f.response is not None and f.response.status_code == 500


def test_an_earlier_step_that_raises_does_not_stop_the_decision(monkeypatch):
    g = _gateway_with_broken(monkeypatch, Providers, "requestheaders", KeyError("provider detection blew up"))
    f = _flow("evil.example.net")
    g.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403  # the policy's own denial, still made


def test_a_waiting_step_runs_the_rest_after_it_in_order():
    order: list[str] = []

    async def slow(arg):
        order.append("slow:start")
        await asyncio.sleep(0.01)
        order.append("slow:end")

    def raises_async(arg):
        async def fail():
            raise RuntimeError("late failure")
        return fail()

    def plain(name):
        def step(arg):
            order.append(name)
        return step

    pending = run_steps("request", [plain("a"), slow, raises_async, plain("b")], None)
    assert order == ["a"] and pending is not None  # nothing after the waiting step has run yet
    asyncio.run(pending)
    assert order == ["a", "slow:start", "slow:end", "b"]
    assert run_steps("request", [plain("c")], None) is None


def test_mitmproxy_sees_one_addon_with_the_hooks_clrk_uses():
    assert [type(a) for a in mitmaddon.addons] == [Gateway]
    g = mitmaddon.addons[0]
    assert [s.__qualname__ for s in g.steps["requestheaders"]][-1] == "Failsafe.requestheaders"
    assert [s.__qualname__ for s in g.steps["request"]][-1] == "Failsafe.request"


def test_the_gateway_process_puts_gateway_where_mitmdump_s_would(tmp_path):
    """`clrk run` starts `python -O -m clrk.proxy`, which registers `Gateway` itself: where `mitmdump -s
    addons/clrk.py` has it (the first script, just before the scripts ScriptLoader runs), so clrk's hooks keep
    running after Proxyserver and before any user script, NextLayer (passthrough decides the layer first),
    DnsResolver, MapRemote, TlsConfig and the rest. It then gets a configure of every option, as a script does:
    a policy named only by CLRK_POLICIES is in force before the proxy serves."""
    (tmp_path / "p.yaml").write_text("kind: EgressGateway\nmetadata: {name: gw}\nspec: {}\n")
    code = (
        "import asyncio, json\n"
        "from mitmproxy.options import Options\n"
        "from clrk.proxy.master import GatewayMaster\n"
        "async def main():\n"
        "    m = GatewayMaster(Options(), with_termlog=False)\n"
        "    g = m.add_gateway()\n"
        "    print(json.dumps([[type(a).__name__ for a in m.addons.chain], g.rt.policy is not None]))\n"
        "asyncio.run(main())\n"
    )
    env = dict(os.environ, CLRK_POLICIES=str(tmp_path), CLRK_DB=str(tmp_path / "db" / "c.duckdb"),
               CLRK_CERTS=str(tmp_path / "certs"))
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    chain, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    at = chain.index("Gateway")
    assert chain.count("Gateway") == 1 and chain[at - 1] == "Proxyserver" and chain[at + 1] == "ScriptLoader"
    assert {"NextLayer", "DnsResolver", "MapRemote", "TlsConfig", "UpstreamAuth"} <= set(chain[at + 1:])
    assert loaded


def test_a_budgeted_call_whose_admission_raised_is_denied_not_sent_unaccounted(monkeypatch):
    from clrk.proxy.steps.routing import ProviderRouting

    def broken(self, flow):
        raise RuntimeError("admission blew up")

    monkeypatch.setattr(ProviderRouting, "route", broken)
    docs = [
        {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}},
        {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-a"},
         "spec": {"credentials": {"tokenSha256": hashlib.sha256(b"tok").hexdigest()}}},
        {"kind": "AIProviderRoute", "metadata": {"name": "chat", "namespace": "team-a"},
         "spec": {"rules": [{"matches": [{"provider": "openai"}],
                             "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": 1000}}]}]}},
    ]
    g = Gateway()
    g.rt.policy = compile_policy(*docs)
    g.rt.ledger.loaded = True
    f = _flow("api.openai.com")
    f.request.path, f.request.method = "/v1/chat/completions", "POST"
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    f.request.headers["content-type"] = "application/json"
    f.request.headers["content-length"] = str(len(body))
    f.request.content = body
    assert g.requestheaders(f) is None and f.response is None
    g.request(f)
    assert f.response is not None and f.response.status_code == 500
    assert "token budget" in json.loads(f.response.content)["error"]["message"]  # the provider shape: OpenAI here
