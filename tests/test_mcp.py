"""MCP egress: JSON-RPC over Streamable HTTP recognised, judged per tool (MCPRoute), listings filtered, one child
record per request/response pair — with the official `mcp` SDK on both ends (its MCPServer over TLS on loopback,
its client through the gateway), and hand-written hostile bodies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from clrk import attributes as A
from clrk import mcp
from clrk.decision import AuthResult, RequestFacts, decide
from tests.harness.gateway import Gateway, agent_docs, gateway_doc, h2_exchange
from tests.harness.mcp_upstream import McpUpstream
from tests.harness.util import compile_policy, wait_for

MCP_KEY = "mcp-injected-SECRET-4242"
REPO = Path(__file__).resolve().parents[1]
CLRK = str(Path(sys.executable).parent / "clrk")
ACCEPT = "application/json, text/event-stream"


def doc(kind, name, spec, ns=None):
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, **({"namespace": ns} if ns else {})}, "spec": spec}


MCP_ROUTE = doc("MCPRoute", "github-mcp", {
    "servers": [{"hostname": "allowed.test", "port": 443, "path": "/mcp"},
                {"hostname": "other.test", "port": 443, "path": "/mcp"},
                {"hostname": "api.github.com", "port": 443, "path": "/"},  # the older HTTP+SSE transport
                {"hostname": "denied.test", "port": 443, "path": "/handler/mcp-split"}],  # hand-written answers
    "sourceAgents": {"namespaces": ["team-a"]},
    "tools": {"allow": ["search_*", "get_*"], "deny": ["delete_*"]},
}, ns="team-a")


# --------------------------------------------------------------------------- parsing and deciding (in-process)


@pytest.mark.parametrize("body, why", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list","params":{"name":"x"}}', "appears twice"),
    (b'{"jsonrpc":"2.0","id":1,"method":"TOOLS/call","params":{"name":"delete_repository"}}', "spelled otherwise"),
    (b'{"jsonrpc":"2.0","id":1,"method":" tools/call","params":{"name":"delete_repository"}}', "spelled otherwise"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["delete_repository"]}}', "params.name as a string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"delete_repository"}', "params.name as a string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}', "not JSON"),
    (b'{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"a"}}', "JSON-RPC 2.0"),
    (b'[]', "empty"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "id must be"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","x":NaN}', "not JSON"),
])
def test_bodies_the_gateway_will_not_guess_at(body, why):
    with pytest.raises(mcp.InvalidMessage, match=why):
        mcp.parse_body(body)


def test_a_body_too_intricate_to_judge_quickly_is_refused():
    many = json.dumps({**_call("search_repos"), "params": {"name": "search_repos", "arguments": {
        "q": [{} for _ in range(mcp.MAX_CONTAINERS)]}}}).encode()
    with pytest.raises(mcp.InvalidMessage, match="not judged"):
        mcp.parse_body(many)
    big_string = json.dumps({**_call("search_repos"), "params": {"name": "search_repos", "arguments": {
        "q": "{[" * mcp.MAX_CONTAINERS}}}).encode()  # brackets inside strings count: a bound, not a verdict
    with pytest.raises(mcp.InvalidMessage):
        mcp.parse_body(big_string)
    assert mcp.parse_body(json.dumps(_call("search_repos")).encode()).messages[0].target == "search_repos"


def test_a_batch_is_read_message_by_message():
    b = mcp.parse_body(json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "delete_repository", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 7, "result": {}},
    ]).encode())
    assert b.batch and [(m.kind, m.method, m.target) for m in b.messages] == [
        ("request", "tools/list", None), ("notification", "notifications/initialized", None),
        ("request", "tools/call", "delete_repository"), ("response", None, None)]


def _facts(body: bytes | None, problem: str | None = None, path: str = "/mcp") -> RequestFacts:
    return RequestFacts("allowed.test", 443, "POST", path, mcp=mcp.parse_body(body) if body else None, mcp_problem=problem)


def _call(name: str, msg_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": name, "arguments": {}}}


@pytest.fixture(scope="module")
def policy(pki):
    return compile_policy(gateway_doc(aliases={}, ca_bundle=str(pki[0])), *agent_docs(), MCP_ROUTE,
                          env={"CLRK_TEST_REVIEWER_TOKEN": "tok-reviewer"})


def _decide(policy, facts):
    agent = policy.agents["team-a.researcher"][0]
    return decide(policy, policy.gateways[0], AuthResult(agent), facts)


def test_tools_are_judged_by_name(policy):
    assert _decide(policy, _facts(json.dumps(_call("search_repos")).encode())).allow
    d = _decide(policy, _facts(json.dumps(_call("delete_repository")).encode()))
    assert not d.allow and d.rule == "MCPRoute/team-a/github-mcp"
    assert d.rpc_errors == ((1, -32001, "clrk: tool delete_repository is not allowed by MCPRoute team-a/github-mcp"),)
    # deny globs hold whatever the letter case; a name no allow glob matches is refused too
    assert not _decide(policy, _facts(json.dumps(_call("DELETE_Repository")).encode())).allow
    assert not _decide(policy, _facts(json.dumps(_call("create_repo")).encode())).allow


def test_a_denied_call_hidden_in_a_batch_refuses_the_batch(policy):
    d = _decide(policy, _facts(json.dumps([_call("search_repos", 1), _call("delete_repository", 2)]).encode()))
    assert not d.allow and d.rpc_batch
    assert [(i, code) for i, code, _ in d.rpc_errors] == [(1, -32001), (2, -32001)]
    assert "not sent" in d.rpc_errors[0][2] and "delete_repository is not allowed" in d.rpc_errors[1][2]


def test_unreadable_bodies_and_other_agents(policy):
    d = _decide(policy, _facts(None, problem="the body is not JSON"))
    assert not d.allow and d.status == 400 and d.rpc_errors[0][1] == -32600
    # ambiguous paths on an MCP server are refused, not left to an EgressRoute
    f = _facts(json.dumps(_call("delete_repository")).encode(), path="/mcp")
    f.path_ambiguity = "an encoded slash"
    assert not _decide(policy, f).allow
    other = policy.agents["team-b.reviewer"][0]
    d = decide(policy, policy.gateways[0], AuthResult(other), _facts(json.dumps(_call("search_repos")).encode()))
    assert not d.allow and d.rule.endswith("defaultPolicy")  # the route is team-a's


def test_wildcard_servers_name_only_their_hosts(pki):
    route = {**MCP_ROUTE, "spec": {**MCP_ROUTE["spec"], "servers": [{"hostname": "*.mcp.example", "path": "/"}]}}
    p = compile_policy(gateway_doc(aliases={}, ca_bundle=str(pki[0])), route)
    assert p.mcp_host("a.mcp.example") and not p.mcp_host("mcp.example") and not p.mcp_host("api.openai.com")
    assert not compile_policy(gateway_doc(aliases={}, ca_bundle=str(pki[0]))).mcp_host("a.mcp.example")


@pytest.mark.parametrize("spec, fragment", [
    ("{}", "spec.servers: Field required"),
    ("{servers: []}", "spec.servers: List should have at least 1 item"),
    ("{servers: [{hostname: API.example.com}]}", "write 'api.example.com'"),
    ("{servers: [{hostname: a.example, path: mcp}]}", "spec.servers[0].path: 'mcp' must be a path prefix"),
    ("{servers: [{hostname: a.example}], tools: {allowed: [x]}}", "spec.tools.allowed: unknown field"),
    ("{servers: [{hostname: a.example, port: 0}]}", "spec.servers[0].port"),
])
def test_an_invalid_mcproute_is_refused_with_the_field_named(tmp_path, spec, fragment):
    from clrk.policy import PolicyError, load_policy

    (tmp_path / "p.yaml").write_text(f"kind: MCPRoute\nmetadata: {{name: m}}\nspec: {spec}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert "document 1 (MCPRoute m)" in str(e.value) and fragment in str(e.value)


def test_the_documented_example_loads(tmp_path):
    import shutil

    from clrk.policy import load_policy

    for f in [*(REPO / "policies").glob("*.yaml"), REPO / "docs" / "examples" / "mcp.yaml"]:
        shutil.copy(f, tmp_path / f.name)
    p = load_policy(tmp_path, env={"GITHUB_MCP_TOKEN": "t"})
    rule = p.mcp_rules[0]
    assert rule.allows("tool", "search_code") and not rule.allows("tool", "delete_file")
    assert not rule.allows("prompt", "anything") and rule.allows("resource", "repo://a/b")
    assert p.injections_for("MCPRoute", "github-mcp", "team-a")[0].field == "Authorization"


def test_listings_are_filtered(policy):
    rule = policy.mcp_rules[0]
    doc_ = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "search_repos"}, {"name": "delete_repository"},
                                                           {"name": 3}, "junk", {"name": "get_issue"}]}}
    assert mcp.filter_listing(doc_, "tools/list", rule.allows) == 3
    assert [t["name"] for t in doc_["result"]["tools"]] == ["search_repos", "get_issue"]


def test_sse_events_are_split_whole_and_bounded():
    ev = mcp.SseEvents(64)
    assert ev.feed(b"event: message\ndata: {\"a\"") == []
    assert ev.feed(b":1}\n\ndata: x\r\n\r\nid: 3") == [b"event: message\ndata: {\"a\":1}\n\n", b"data: x\r\n\r\n"]
    assert mcp.event_data(b"event: message\ndata: {\"a\":1}\n\n") == '{"a":1}'
    with pytest.raises(mcp.InvalidMessage):
        ev.feed(b"x" * 100)


# --------------------------------------------------------------------------- through a real gateway


@pytest.fixture(scope="module")
def servers(pki):
    sse, js, legacy = McpUpstream(pki[1]), McpUpstream(pki[1], json_response=True), McpUpstream(pki[1], legacy=True)
    yield sse, js, legacy
    for s in (sse, js, legacy):
        s.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, servers, otlp, upstream):
    sse, js, legacy = servers
    docs = [
        gateway_doc(aliases={"allowed.test": sse.address, "other.test": js.address, "llm-b.test": js.address,
                             "api.github.com": legacy.address, "denied.test": upstream.address},
                    ca_bundle=str(pki[0]), max_bytes=65536, endpoint=otlp.endpoint),
        *agent_docs(),
        MCP_ROUTE,
        doc("EgressRoute", "plain-mcp", {"hostnames": ["llm-b.test"]}),
        doc("CredentialInjectionPolicy", "mcp-key", {
            "targetRefs": [{"kind": "MCPRoute", "name": "github-mcp"}],
            "target": {"type": "Header", "name": "Authorization", "prefix": "Bearer "},
            "secretRef": {"env": "CLRK_TEST_MCP_KEY"}}),
    ]
    g = Gateway(tmp_path_factory.mktemp("mcp-gw"), docs, env={"CLRK_TEST_MCP_KEY": MCP_KEY}).start()
    g.docs = docs
    yield g
    g.stop()


async def _session(gw: Gateway, host: str, work):
    client = httpx2.AsyncClient(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, timeout=30)
    async with client, streamable_http_client(f"https://{host}/mcp", http_client=client) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


@pytest.mark.parametrize("host", ["allowed.test", "other.test"])  # answers on SSE streams, then as JSON bodies
def test_sdk_client_sees_allowed_tools_and_is_refused_the_rest(gw, servers, otlp, host):
    server = servers[0] if host == "allowed.test" else servers[1]
    server.called.clear()

    async def work(session):
        listed = await session.list_tools()
        found = await session.call_tool("search_repos", {"query": "clrk"})
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_repository", {"name": "prod"})
        failed = await session.call_tool("get_issue", {"number": -1})
        return listed, found, refused.value, failed

    listed, found, refused, failed = asyncio.run(_session(gw, host, work))
    assert sorted(t.name for t in listed.tools) == ["get_issue", "search_confirmed", "search_repos"]  # no delete_*
    assert found.content[0].text == "found: clrk"
    assert refused.error.code == -32001
    assert refused.error.message == "clrk: tool delete_repository is not allowed by MCPRoute team-a/github-mcp"
    assert failed.is_error
    assert [c[0] for c in server.called] == ["search_repos", "get_issue"]  # the refused call never arrived
    assert server.authorizations and all(a == f"Bearer {MCP_KEY}" for a in server.authorizations)

    rows = _wait_children(gw, host, 3)
    by_tool = {r[A.GEN_AI_TOOL_NAME]: r for r in rows}
    ok, denied, err = by_tool["search_repos"], by_tool["delete_repository"], by_tool["get_issue"]
    assert ok[A.GEN_AI_OPERATION_NAME] == "execute_tool" and A.ERROR_TYPE not in ok
    assert ok[A.MCP_SESSION_ID].startswith("sha256:") and ok[A.MCP_PROTOCOL_VERSION]
    assert json.loads(ok[A.REQUEST_BODY])["params"]["arguments"] == {"query": "clrk"}
    assert "found: clrk" in ok[A.RESPONSE_BODY]
    assert denied[A.ERROR_TYPE] == "policy_denied" and denied[A.CLRK_DECISION] == "deny"
    assert denied[A.CLRK_DECISION_RULE] == "MCPRoute/team-a/github-mcp"
    assert err[A.ERROR_TYPE] == "tool_error"
    parents = {r[A.SPAN_ID]: r for r in gw.records(host=host)}
    for r in rows:
        parent = parents[r[A.PARENT_SPAN_ID]]
        assert parent[A.TRACE_ID] == r[A.TRACE_ID] and A.MCP_METHOD_NAME not in parent
    assert MCP_KEY not in json.dumps(gw.records(host=host))
    span = otlp.span(ok[A.SPAN_ID])
    assert span["name"] == "tools/call search_repos" and span["parent_span_id"] == ok[A.PARENT_SPAN_ID]
    assert span["attributes"][A.GEN_AI_TOOL_NAME] == "search_repos" and span["attributes"][A.MCP_METHOD_NAME] == "tools/call"
    assert otlp.span(denied[A.SPAN_ID])["name"] == "tools/call delete_repository"
    assert otlp.span(ok[A.PARENT_SPAN_ID])["name"] == f"POST {host}"
    assert MCP_KEY not in json.dumps(otlp.got.spans) + json.dumps(otlp.got.logs)


def test_server_messages_on_the_stream_and_a_session_across_posts(gw, servers):
    """A tool that reports progress and asks the client (elicitation) while it runs: the server's notification and request
    arrive on the POST's event stream, the client's answer in a POST of its own; each is a child record, all of
    one session."""
    from mcp import types

    async def elicited(context, params):
        return types.ElicitResult(action="accept", content={"ok": True})

    async def work(session):
        progress = []

        async def on_progress(done, total, message):
            progress.append(message)

        result = await session.call_tool("search_confirmed", {"query": "clrk"}, progress_callback=on_progress)
        assert progress == ["about to search clrk"]
        return result

    async def run():
        client = httpx2.AsyncClient(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, timeout=30)
        async with client, streamable_http_client("https://allowed.test/mcp", http_client=client) as (read, write):
            async with ClientSession(read, write, elicitation_callback=elicited) as session:
                await session.initialize()
                return await work(session)

    result = asyncio.run(run())
    assert result.content[0].text == "confirmed: accept"

    def rows():
        # The client's answer is a POST of its own, whose 202 may reach the proxy after the stream that asked ended:
        # wait for its record too, not only for the stream's.
        got = [r for r in gw.records(host="allowed.test") if A.is_mcp_child(r)]
        asked = {r[A.JSONRPC_REQUEST_ID] for r in got if r.get(A.MCP_METHOD_NAME) == "elicitation/create"}
        answered = any(A.MCP_METHOD_NAME not in r and r.get(A.JSONRPC_REQUEST_ID) in asked for r in got)
        return got if answered and any(r.get(A.GEN_AI_TOOL_NAME) == "search_confirmed" for r in got) else None

    got = wait_for(rows, "the children of the elicited call and the client's answer")
    call = next(r for r in got if r.get(A.GEN_AI_TOOL_NAME) == "search_confirmed")
    session_rows = [r for r in got if r.get(A.MCP_SESSION_ID) == call[A.MCP_SESSION_ID]]
    methods = {r.get(A.MCP_METHOD_NAME) for r in session_rows}
    assert {"initialize", "notifications/initialized", "tools/call", "notifications/progress",
            "elicitation/create"} <= methods
    elicit = next(r for r in session_rows if r.get(A.MCP_METHOD_NAME) == "elicitation/create")
    assert A.ERROR_TYPE not in elicit  # a request from the server: its answer comes in the client's next POST
    answer = next(r for r in session_rows if A.MCP_METHOD_NAME not in r and r.get(A.JSONRPC_REQUEST_ID) == elicit[A.JSONRPC_REQUEST_ID])
    assert json.loads(answer[A.REQUEST_BODY])["result"]["action"] == "accept"
    assert len({r[A.PARENT_SPAN_ID] for r in session_rows}) >= 3  # several POSTs, one session


def test_clrk_records_and_the_dev_filter_show_mcp_calls(gw, servers):
    """`clrk records --mcp` lists the messages alone, readably (method and tool where a model would be); the
    TUI's filter "mcp" (or a tool name) keeps them."""
    from clrk.cli.dev.tui import matches

    async def work(session):  # its own calls, waited for by their arguments (not an earlier test's)
        await session.call_tool("get_issue", {"number": 7301})
        with pytest.raises(MCPError):
            await session.call_tool("delete_repository", {"name": "n7301"})

    asyncio.run(_session(gw, "other.test", work))
    wait_for(lambda: sum("7301" in (r.get(A.REQUEST_BODY) or "") for r in gw.records(host="other.test")
                         if r.get(A.GEN_AI_TOOL_NAME) in ("get_issue", "delete_repository")) == 2, "both calls' records")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    text = subprocess.run([CLRK, "records", "--db", str(gw.db), "--mcp", "--limit", "0"], capture_output=True,
                          text=True, check=True, env=env).stdout.splitlines()
    assert text and all("  MCP  " in line for line in text)
    assert any("tools/call get_issue" in line for line in text)
    assert any("tools/call delete_repository" in line and "deny" in line for line in text)
    rows = [json.loads(line) for line in subprocess.run(
        [CLRK, "records", "--db", str(gw.db), "--mcp", "--json", "--limit", "0"], capture_output=True, text=True,
        check=True, env=env).stdout.splitlines()]
    assert rows and all(A.is_mcp_child(r) for r in rows)
    call = next(r for r in rows if r.get(A.GEN_AI_TOOL_NAME) == "get_issue")
    parent = next(r for r in gw.records(host="other.test") if r[A.SPAN_ID] == call[A.PARENT_SPAN_ID])
    assert matches("mcp", call) and matches("get_issue", call) and not matches("mcp", parent)


def test_mcp_on_an_ordinary_route_is_recorded_not_judged(gw, servers):
    """No MCPRoute names llm-b.test; an EgressRoute allows it: its MCP traffic (known by the transport's headers)
    is recorded message by message, and no tool is judged there (nor any credential injected)."""
    servers[1].called.clear()

    async def work(session):
        return await session.call_tool("delete_repository", {"name": "x"})

    assert asyncio.run(_session(gw, "llm-b.test", work)).content[0].text == "deleted x"
    assert servers[1].called == [("delete_repository", {"name": "x"})]
    assert servers[1].authorizations[-1] is None
    row = wait_for(lambda: next((r for r in gw.records(host="llm-b.test")
                                 if r.get(A.GEN_AI_TOOL_NAME) == "delete_repository"), None), "the unjudged call")
    assert row[A.CLRK_DECISION_RULE] == "EgressRoute/default/plain-mcp" and A.ERROR_TYPE not in row


def test_an_mcproute_change_applies_without_a_restart(gw, servers):
    """Hot reload: the route now allows delete_*; the next call goes through; the old policy comes back."""
    allowing = json.loads(json.dumps(gw.docs))
    route = next(d for d in allowing if d["kind"] == "MCPRoute")
    route["spec"]["tools"] = {"allow": ["*"]}
    try:
        reloads = gw.log().count("policy reloaded")
        gw.write_policy(allowing)
        wait_for(lambda: gw.log().count("policy reloaded") > reloads, "the reload")

        async def work(session):
            names = sorted(t.name for t in (await session.list_tools()).tools)
            return names, await session.call_tool("delete_repository", {"name": "y"})

        names, done = asyncio.run(_session(gw, "other.test", work))
        assert "delete_repository" in names and done.content[0].text == "deleted y"
    finally:
        reloads = gw.log().count("policy reloaded")
        gw.write_policy(gw.docs)
        wait_for(lambda: gw.log().count("policy reloaded") > reloads, "the reload back")
    status, answer = _post(gw, json.dumps(_call("delete_repository")).encode())
    assert json.loads(answer)["error"]["code"] == -32001


def test_a_listing_split_into_single_bytes_is_filtered_whole(policy):
    """The event stream reader holds each event until it is whole, however the bytes arrive."""
    from clrk.proxy.mcp import McpExchange, McpStream

    ex = McpExchange("s", "2025-06-18")
    ex.rule = policy.mcp_rules[0]
    ex.request(mcp.parse_body(b'{"jsonrpc":"2.0","id":4,"method":"tools/list"}'), 0.0)
    listing = {"jsonrpc": "2.0", "id": 4, "result": {"tools": [{"name": "delete_repository"}, {"name": "get_issue"}]}}
    wire = b"event: message\r\ndata: " + json.dumps(listing).encode() + b"\r\n\r\n: keep-alive\n\n"
    seen = []
    stream = McpStream(ex, seen.append, sse=True)
    pieces = [stream(wire[i:i + 1]) for i in range(len(wire))] + [stream(b"")]
    assert all(isinstance(p, list) and b"" not in p for p in pieces)  # never an empty piece: it would end the body
    out = b"".join(b"".join(p) for p in pieces)
    assert b"".join(seen) == wire  # the capture saw what the upstream sent
    events = out.split(b"\n\n")
    assert json.loads(mcp.event_data(events[0] + b"\n\n"))["result"]["tools"] == [{"name": "get_issue"}]
    assert events[0].startswith(b"event: message\n") and b": keep-alive" in out
    assert ex.filtered == 1 and not ex.pending


def test_the_older_http_sse_transport(gw, servers):
    """GET /sse carries the answers, POST /messages/ the requests: the POSTs are judged, the listing on the
    stream is filtered (paired with its request by session and id), and a refused call never reaches the
    server: its POST gets 202 and its error goes on the stream (this transport's clients read answers only
    there), before the next bytes the server sends on it."""
    from mcp.client.sse import sse_client

    legacy = servers[2]
    legacy.called.clear()

    def factory(headers=None, timeout=None, auth=None):
        return httpx2.AsyncClient(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False, headers=headers,
                                  timeout=timeout or 30, auth=auth)

    async def run():
        async with sse_client("https://api.github.com/sse", httpx_client_factory=factory) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                names = sorted(t.name for t in (await session.list_tools()).tools)
                refused = asyncio.create_task(session.call_tool("delete_repository", {"name": "z"}))
                # once the gateway has refused it, the next answer on the stream carries the refusal along
                await asyncio.to_thread(gw.wait_log, "denied POST api.github.com:443/messages/")
                found = await session.call_tool("search_repos", {"query": "old"})
                with pytest.raises(MCPError) as e:
                    await asyncio.wait_for(refused, 10)
                return names, found, e.value

    names, found, refused = asyncio.run(run())
    assert refused.error.code == -32001 and "delete_repository is not allowed" in refused.error.message
    assert "delete_repository" not in names and "search_repos" in names
    assert found.content[0].text == "found: old"
    assert [c[0] for c in legacy.called] == ["search_repos"]
    denied = wait_for(lambda: next((r for r in gw.records(host="api.github.com")
                                    if r.get(A.GEN_AI_TOOL_NAME) == "delete_repository"), None), "the refused call")
    assert denied[A.ERROR_TYPE] == "policy_denied"

    # The POST was answered 202 (no answer there, no error); the answer, on the GET stream, is paired with the
    # request by session and id: its record names the tool and holds the result.
    def pair():
        rows = [r for r in gw.records(host="api.github.com") if r.get(A.GEN_AI_TOOL_NAME) == "search_repos"]
        return rows if len(rows) == 2 else None

    rows = wait_for(pair, "the search_repos call and its answer on the stream")
    parents = {r[A.SPAN_ID]: r for r in gw.records(host="api.github.com") if not A.is_mcp_child(r)}
    sent = next(r for r in rows if parents[r[A.PARENT_SPAN_ID]][A.HTTP_REQUEST_METHOD] == "POST")
    answered = next(r for r in rows if parents[r[A.PARENT_SPAN_ID]][A.HTTP_REQUEST_METHOD] == "GET")
    assert A.ERROR_TYPE not in sent and "search_repos" in sent[A.REQUEST_BODY] and A.RESPONSE_BODY not in sent
    assert answered[A.MCP_METHOD_NAME] == "tools/call" and "found: old" in answered[A.RESPONSE_BODY]
    assert answered[A.JSONRPC_REQUEST_ID] == sent[A.JSONRPC_REQUEST_ID] and answered[A.TIME] == sent[A.TIME]
    assert answered[A.MCP_SESSION_ID] == sent[A.MCP_SESSION_ID]


def test_an_event_stream_cut_mid_event_reaches_the_agent_whole_and_filtered(gw, upstream):
    """A hand-written server sends the tools/list answer as a chunked event stream cut inside events: the agent
    gets every event whole, in order, the listing filtered, and the stream's end only at its end."""
    import time

    listing = {"jsonrpc": "2.0", "id": 31, "result": {"tools": [{"name": "delete_repository"}, {"name": "get_issue"}]}}
    wire = (b": opening\n\nevent: message\ndata: " + json.dumps(listing).encode() + b"\n\n"
            + b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n')
    cuts = (5, 40, len(wire) - 10)

    def split(handler, seen):
        handler.start_chunked(200, "text/event-stream")
        for a, b in zip((0, *cuts), (*cuts, len(wire)), strict=True):
            handler._chunk(wire[a:b])
            time.sleep(0.05)  # each piece its own read: the gateway must hold the event, not end the stream
        handler.end_chunked()

    upstream.handlers["mcp-split"] = split
    with gw.client() as c:
        r = c.post("https://denied.test/handler/mcp-split", content=json.dumps({"jsonrpc": "2.0", "id": 31,
                   "method": "tools/list"}), headers={"content-type": "application/json", "accept": ACCEPT})
    events = [e for e in r.content.split(b"\n\n") if e]
    assert events[0] == b": opening"
    assert json.loads(mcp.event_data(events[1] + b"\n\n"))["result"]["tools"] == [{"name": "get_issue"}]
    assert json.loads(mcp.event_data(events[2] + b"\n\n"))["method"] == "notifications/tools/list_changed"
    assert len(events) == 3


@pytest.mark.parametrize("answer", [
    b'{"jsonrpc":"2.0","id":32,"result":{"tools":[{"name":"get_issue"}],"tools":[{"name":"delete_repository"}]}}',
    b'{"jsonrpc":"2.0","id":32,"result":{"tools":[{"name":"delete_repository"}]',
    json.dumps({"jsonrpc": "2.0", "id": 32, "result": {"tools": [{"name": "delete_repository"}],
                                                       "pad": [{} for _ in range(mcp.MAX_CONTAINERS)]}}).encode(),
])
def test_a_listing_the_gateway_cannot_read_is_not_passed_on(gw, upstream, answer):
    """A server's tools/list answer with a repeated member, cut short, or too intricate to read in bounded
    time: the agent gets the gateway's JSON-RPC error instead of a listing nobody filtered."""
    def reply(handler, seen):
        handler._send(200, answer)

    upstream.handlers["mcp-split"] = reply
    with gw.client() as c:
        r = c.post("https://denied.test/handler/mcp-split", content=json.dumps({"jsonrpc": "2.0", "id": 32,
                   "method": "tools/list"}), headers={"content-type": "application/json", "accept": ACCEPT})
    assert b"delete_repository" not in r.content
    got = r.json()
    assert got["id"] == 32 and got["error"]["code"] == -32603 and got["error"]["message"].startswith("clrk: ")


@pytest.mark.parametrize("sse", [True, False])
def test_an_answer_too_long_to_hold_never_carries_a_listing_through(policy, sse):
    """Past the bound an answer is not held: with a listing awaited, the listing becomes the gateway's error and
    nothing more of the answer passes; with none, the answer passes on unread."""
    from clrk.proxy.mcp import McpExchange, McpStream

    for listing in (True, False):
        ex = McpExchange("s", None)
        ex.rule = policy.mcp_rules[0]
        ex.request(mcp.parse_body(json.dumps({"jsonrpc": "2.0", "id": 9,
                                              "method": "tools/list" if listing else "tools/call",
                                              "params": {"name": "get_issue"}}).encode()), 0.0)
        stream = McpStream(ex, None, sse=sse, limit=64)
        head = (b"data: " if sse else b"") + b'{"jsonrpc":"2.0","id":9,"result":{"tools":[{"name":"delete_repository"}'
        out = [*stream(head), *stream(b", " * 40), *stream(b"]}}" + (b"\n\n" if sse else b"")), *stream(b"")]
        passed = b"".join(out)
        assert b"" not in out
        if listing:
            assert b"delete_repository" not in passed
            doc_ = json.loads(mcp.event_data(passed) if sse else passed)
            assert doc_["id"] == 9 and doc_["error"]["code"] == -32603 and not ex.pending
        else:
            assert passed.endswith(b"]}}" + (b"\n\n" if sse else b"")) and b"delete_repository" in passed


def _wait_children(gw: Gateway, host: str, n: int) -> list[dict]:
    def calls():
        rows = [r for r in gw.records(host=host) if r.get(A.MCP_METHOD_NAME) == "tools/call"]
        return rows if len(rows) >= n else None

    rows = wait_for(calls, f"{n} tools/call records for {host}")
    return rows[:n]


def _post(gw: Gateway, body: bytes, host: str = "other.test") -> tuple[int, bytes]:
    with gw.client() as c:
        r = c.post(f"https://{host}/mcp", content=body,
                   headers={"content-type": "application/json", "accept": ACCEPT, "mcp-protocol-version": "2025-06-18"})
        return r.status_code, r.content


@pytest.mark.parametrize("body, code", [
    (json.dumps([_call("search_repos", 1), _call("delete_repository", 2)]).encode(), -32001),
    (b'{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"delete_repository"}}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping","params":{"name":"delete_repository"}}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":{"$":"delete_repository"}}}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repository"', -32600),
    (b'\xff\xfe not json at all', -32600),
])
def test_hostile_bodies_never_reach_the_server(gw, servers, body, code):
    servers[1].called.clear()
    before = len(servers[1].authorizations)
    status, answer = _post(gw, body)
    doc_ = json.loads(answer)
    first = doc_[0] if isinstance(doc_, list) else doc_
    assert first["error"]["code"] == code and first["error"]["message"].startswith("clrk: ")
    assert len(servers[1].authorizations) == before and servers[1].called == []
    # the gateway is still serving
    assert _post(gw, json.dumps({"jsonrpc": "2.0", "id": 9, "method": "ping"}).encode())[0] < 500


@pytest.mark.parametrize("method", ["POST", "PUT", "GET"])
def test_an_http2_body_without_a_length_is_judged_too(gw, servers, method):
    """HTTP/2 carries a body without content-length, on any method: it is read and judged all the same."""
    before, called = len(servers[1].authorizations), list(servers[1].called)
    msg_id = {"POST": 77, "PUT": 78, "GET": 79}[method]  # each method's own record, not an earlier one's
    status = h2_exchange(gw, [(":method", method), (":scheme", "https"), (":authority", "other.test"), (":path", "/mcp"),
                              ("content-type", "application/json"), ("accept", ACCEPT)],
                         "other.test:443", "other.test", body=json.dumps(_call("delete_repository", msg_id)).encode())
    assert status == 200  # the gateway's JSON-RPC refusal
    assert len(servers[1].authorizations) == before and servers[1].called == called
    row = wait_for(lambda: next((r for r in gw.records(host="other.test")
                                 if r.get(A.JSONRPC_REQUEST_ID) == str(msg_id) and r.get(A.HTTP_REQUEST_METHOD) is None
                                 and r.get(A.CLRK_DECISION) == "deny"), None), "the refused HTTP/2 call")
    assert row[A.GEN_AI_TOOL_NAME] == "delete_repository"


def test_a_batch_of_many_messages_is_judged_whole_and_recorded_within_bounds(gw, servers):
    from clrk.proxy.mcp import MAX_CHILDREN

    before = len(servers[1].authorizations)
    batch = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(MAX_CHILDREN + 500)]
    status, answer = _post(gw, json.dumps([*batch, _call("delete_repository", "last")]).encode())
    refused = json.loads(answer)
    assert len(refused) == MAX_CHILDREN + 501 and refused[-1]["error"]["code"] == -32001
    assert len(servers[1].authorizations) == before
    gw.wait_log("carried 1501 messages; the first 1000 are recorded")


def test_huge_params_are_judged_and_forwarded(gw, servers):
    before = len(servers[1].authorizations)
    big = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
           "params": {"name": "search_repos", "arguments": {"query": "x" * (3 * 1024 * 1024)}}}
    status, answer = _post(gw, json.dumps(big).encode())
    assert b"clrk:" not in answer  # the server answered (no session: its own error), not the gateway
    assert len(servers[1].authorizations) == before + 1
    huge_denied = {**big, "params": {"name": "delete_repository", "arguments": big["params"]["arguments"]}}
    status, answer = _post(gw, json.dumps(huge_denied).encode())
    assert json.loads(answer)["error"]["code"] == -32001
    assert len(servers[1].authorizations) == before + 1


# --------------------------------------------------------------------------- the steps in-process (mitmproxy's tflow)


@pytest.fixture
def sg():
    """A real Gateway on the in-process test policy of tests/test_steps.py plus an MCPRoute for mcp.test."""
    import time as _time

    from clrk.proxy.budget import utc_day
    from clrk.proxy.gateway import Gateway as ProxyGateway
    from clrk.proxy.runtime import Runtime
    from tests.test_steps import DOCS

    route = {**MCP_ROUTE, "spec": {**MCP_ROUTE["spec"], "servers": [{"hostname": "mcp.test", "path": "/mcp"}],
                                   "sourceAgents": {}}}
    g = ProxyGateway(Runtime())
    g.rt.policy = compile_policy(*DOCS, route, env={"K_OPENAI": "k", "K_GEMINI": "k"})
    g.rt.ledger.load(utc_day(_time.time()), {})
    return g


def test_ordinary_requests_get_no_mcp_exchange(sg):
    from tests.test_steps import answer, connect, request, send

    f = send(sg, request(connect(sg, "allowed.test"), "/mcp", "POST", json.dumps(_call("delete_repository")).encode(),
                         headers={"content-type": "application/json"}))
    assert f.metadata["clrk"].mcp is None
    assert "mcp" not in answer(sg, f)


def test_an_mcp_body_nobody_read_is_refused_not_let_through(sg):
    """Should reading the body be skipped (a step failing quietly), the request is refused, never judged as empty."""
    from tests.test_steps import connect, request, send

    sg.egress.read_mcp = None
    f = send(sg, request(connect(sg, "mcp.test"), "/mcp", "POST", json.dumps(_call("search_repos")).encode(),
                         headers={"content-type": "application/json"}))
    assert f.response is not None and f.response.status_code == 400
    assert json.loads(f.response.content)["error"] == {"code": -32600,
                                                       "message": "clrk: the MCP request body could not be read"}


def test_a_buffered_listing_is_filtered_and_each_pair_is_a_child(sg):
    from tests.test_steps import answer, connect, request, send

    body = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                       {"jsonrpc": "2.0", "method": "notifications/initialized"}]).encode()
    f = send(sg, request(connect(sg, "mcp.test"), "/mcp", "POST", body,
                         headers={"content-type": "application/json", "mcp-protocol-version": "2025-03-26",
                                  "mcp-session-id": "sess-secret-1", "accept-encoding": "gzip"}))
    assert f.request.headers["accept-encoding"] == "identity" and f.metadata["clrk"].decision.allow
    listing = json.dumps([{"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "delete_repository"},
                                                                            {"name": "search_repos"}]}}]).encode()
    snap = answer(sg, f, body=listing)
    assert json.loads(f.response.content)[0]["result"]["tools"] == [{"name": "search_repos"}]
    kids = {c["method"]: c for c in snap["mcp"]}
    assert set(kids) == {"tools/list", "notifications/initialized"}
    assert kids["tools/list"]["id"] == "1" and kids["tools/list"]["error"] is None
    assert b"search_repos" in kids["tools/list"]["resp"] and b"delete_repository" not in kids["tools/list"]["resp"]
    assert kids["notifications/initialized"]["id"] is None and kids["notifications/initialized"]["resp"] is None
    assert snap["mcp_session"] == ("sess-secret-1", "2025-03-26")
    from clrk.recorder.expand import expand, mcp_rows
    from clrk.redact import DEFAULT

    parent = expand(snap, DEFAULT)
    rows = mcp_rows(snap, parent)
    assert all(r[A.PARENT_SPAN_ID] == parent[A.SPAN_ID] and r[A.TRACE_ID] == parent[A.TRACE_ID] for r in rows)
    assert {r[A.MCP_SESSION_ID] for r in rows} == {"sha256:" + hashlib.sha256(b"sess-secret-1").hexdigest()[:16]}
    assert "sess-secret-1" not in json.dumps([parent, *rows])
