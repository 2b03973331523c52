"""The decision is a pure function: every branch of the contract's order, without a proxy."""

from __future__ import annotations

import pytest

from clrk.decision import AuthResult, RequestFacts, decide
from clrk.hostnames import norm_host
from tests.harness.util import compile_policy

GW = {"kind": "EgressGateway", "metadata": {"name": "gw"}, "spec": {}}
AGENT = {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-a", "labels": {"tier": "batch"}},
         "spec": {"credentials": {"tokenSha256": "0" * 64}}}
OTHER = {"kind": "Agent", "metadata": {"name": "bot", "namespace": "team-b"}, "spec": {"credentials": {"tokenSha256": "1" * 64}}}


def agent(p, user="team-a.bot"):
    return p.agents[user][0]


def run(p, host, port=443, method="GET", path="/", user="team-a.bot", **kw):
    return decide(p, p.gateways[0], AuthResult(agent(p, user)), RequestFacts(host, port, method, path, **kw))


def test_no_agent_is_407_with_reason():
    p = compile_policy(GW, AGENT)
    d = decide(p, p.gateways[0], AuthResult(None, "wrong token for agent team-a/bot"), RequestFacts("a.com", 443))
    assert (d.allow, d.status, d.rule, d.reason) == (False, 407, "authentication", "wrong token for agent team-a/bot")


def test_default_deny_all_names_what_was_denied():
    d = run(compile_policy(GW, AGENT), "example.com", path="/x")
    assert not d.allow and d.status == 403
    assert d.rule == "EgressGateway/gw/defaultPolicy"
    assert "GET example.com:443/x" in d.reason and "team-a/bot" in d.reason


def test_allow_all_default():
    gw = {**GW, "spec": {"defaultPolicy": "allow-all"}}
    d = run(compile_policy(gw, AGENT), "example.com")
    assert d.allow and d.rule == "EgressGateway/gw/defaultPolicy"


def test_route_matches_host_port_method_path_and_agent():
    r = {"kind": "EgressRoute", "metadata": {"name": "gh"},
         "spec": {"hostnames": ["api.github.com", "*.pythonhosted.org"], "methods": ["get"], "paths": ["/repos/"],
                  "sourceAgents": {"namespaces": ["team-a"], "matchLabels": {"tier": "batch"}}}}
    p = compile_policy(GW, AGENT, OTHER, r)
    assert run(p, "api.github.com", path="/repos/x").rule == "EgressRoute/default/gh"
    assert run(p, "files.pythonhosted.org", path="/repos/x").allow
    assert run(p, "a.b.pythonhosted.org", path="/repos/x").allow
    assert not run(p, "pythonhosted.org", path="/repos/x").allow  # a wildcard is not the apex
    assert not run(p, "api.github.com", path="/users/x").allow
    assert not run(p, "api.github.com", method="POST", path="/repos/x").allow
    assert not run(p, "api.github.com", port=8443, path="/repos/x").allow  # ports default to [443]
    assert not run(p, "api.github.com", path="/repos/x", user="team-b.bot").allow


def test_deny_policy_overrides_allow_with_its_status_and_message():
    r = {"kind": "EgressRoute", "metadata": {"name": "all"}, "spec": {"hostnames": ["*"]}}
    dn = {"kind": "EgressDenyPolicy", "metadata": {"name": "no-paste"},
          "spec": {"hostnames": ["pastebin.com"], "denyResponse": {"statusCode": 451, "message": "no pastes"}}}
    p = compile_policy(GW, AGENT, r, dn)
    d = run(p, "pastebin.com")
    assert (d.allow, d.status, d.rule, d.reason) == (False, 451, "EgressDenyPolicy/default/no-paste", "no pastes")
    assert run(p, "example.com").allow


def test_destination_must_agree_with_sni_and_host():
    r = {"kind": "EgressRoute", "metadata": {"name": "ok"}, "spec": {"hostnames": ["ok.com"]}}
    p = compile_policy(GW, AGENT, r)
    assert run(p, "ok.com", sni="ok.com", authority="ok.com", authority_port=443).allow
    d = run(p, "ok.com", sni="evil.com")
    assert d.rule == "destination-check" and "evil.com" in d.reason
    d = run(p, "ok.com", authority="evil.com", authority_port=443)
    assert d.rule == "destination-check" and "evil.com" in d.reason
    assert run(p, "ok.com", authority="ok.com", authority_port=8443).rule == "destination-check"


@pytest.mark.parametrize("raw,norm", [("API.GitHub.com.", "api.github.com"), ("[::1]", "::1"), ("bücher.de", "xn--bcher-kva.de")])
def test_norm_host(raw, norm):
    assert norm_host(raw) == norm


@pytest.mark.parametrize("host", ["140.82.112.6", "2130706433", "0x7f000001", "017700000001", "::ffff:8c52:7006", "api.github.com.evil.com"])
def test_literal_and_lookalike_hosts_do_not_match_a_hostname_rule(host):
    r = {"kind": "EgressRoute", "metadata": {"name": "gh"}, "spec": {"hostnames": ["api.github.com"]}}
    assert not run(compile_policy(GW, AGENT, r), host).allow


# ------------------------------------------------------------------------------------------- AIProviderRoute

APR = {"kind": "AIProviderRoute", "metadata": {"name": "chat", "namespace": "team-a"},
       "spec": {"sourceAgents": {"namespaces": ["team-a"]},
                "rules": [{"matches": [{"provider": "openai", "models": ["gpt-4o*"], "endpoints": ["/v1/chat/completions"]}]},
                          {"matches": [{"provider": "vllm"}], "backendRefs": [{"name": "vllm"}]}]}}
BACKEND = {"kind": "Backend", "metadata": {"name": "vllm"},
           "spec": {"schema": {"name": "openai"}, "upstream": {"host": "llm.internal", "port": 8443}}}


def prov(p, host, path, model, pending=False, user="team-a.bot", provider="openai"):
    facts = RequestFacts(host, 443, "POST", path, provider=provider, provider_names=p.provider_names_by_host.get(host, ()),
                         model=model, model_pending=pending)
    return decide(p, p.gateways[0], AuthResult(agent(p, user)), facts)


def test_provider_route_allows_matching_model_and_endpoint():
    p = compile_policy(GW, AGENT, OTHER, APR, BACKEND)
    d = prov(p, "api.openai.com", "/v1/chat/completions", "gpt-4o-mini")
    assert d.allow and d.rule == "AIProviderRoute/team-a/chat#rules[0]" and d.provider_rule.route_name == "chat"
    assert not prov(p, "api.openai.com", "/v1/chat/completions", "gpt-3.5-turbo").allow
    assert not prov(p, "api.openai.com", "/v1/embeddings", "gpt-4o").allow
    assert not prov(p, "api.openai.com", "/v1/chat/completions", "gpt-4o", user="team-b.bot").allow


def test_provider_route_waits_for_the_model_only_when_it_matters():
    p = compile_policy(GW, AGENT, OTHER, APR, BACKEND)
    assert prov(p, "api.openai.com", "/v1/chat/completions", None, pending=True) is None
    # No AIProviderRoute serves team-b: nothing to wait for.
    assert prov(p, "api.openai.com", "/v1/chat/completions", None, pending=True, user="team-b.bot").allow is False
    # Auth, destination and deny policies never wait.
    d = decide(p, p.gateways[0], AuthResult(None, "no creds"), RequestFacts("api.openai.com", 443, "POST", "/v1/chat/completions", provider="openai", model_pending=True))
    assert d is not None and d.status == 407


def test_unmatched_provider_call_falls_through_with_a_reason_naming_that():
    p = compile_policy(GW, AGENT, APR, BACKEND)
    d = prov(p, "api.openai.com", "/v1/chat/completions", "o1")
    assert not d.allow and d.rule == "EgressGateway/gw/defaultPolicy"
    assert d.reason.startswith("no AIProviderRoute rule matches openai model o1 at /v1/chat/completions, and no route allows")
    r = {"kind": "EgressRoute", "metadata": {"name": "oai"}, "spec": {"hostnames": ["api.openai.com"]}}
    d = prov(compile_policy(GW, AGENT, APR, BACKEND, r), "api.openai.com", "/v1/chat/completions", "o1")
    assert d.allow and d.rule == "EgressRoute/default/oai" and d.provider_rule is None


def test_a_backend_name_is_a_provider():
    p = compile_policy(GW, AGENT, APR, BACKEND)
    d = prov(p, "llm.internal", "/v1/chat/completions", "llama-3")
    assert d.allow and d.rule == "AIProviderRoute/team-a/chat#rules[1]"
    assert [b.name for b, _ in d.provider_rule.backends] == ["vllm"]


def test_a_backend_sharing_a_schema_is_not_that_provider():
    """`provider: openai` covers OpenAI's own API, not every host that speaks its schema (whose route could
    carry OpenAI's key there)."""
    apr = {**APR, "spec": {**APR["spec"], "rules": [{"matches": [{"provider": "openai"}]}]}}
    p = compile_policy(GW, AGENT, apr, BACKEND)
    assert prov(p, "api.openai.com", "/v1/chat/completions", "gpt-4o").allow
    assert not prov(p, "llm.internal", "/v1/chat/completions", "gpt-4o").allow


@pytest.mark.parametrize("spelling", ["169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "::ffff:169.254.169.254"])
def test_every_spelling_of_a_denied_ip_is_denied(spelling):
    allow_all = {**GW, "spec": {"defaultPolicy": "allow-all"}}
    dn = {"kind": "EgressDenyPolicy", "metadata": {"name": "metadata"}, "spec": {"hostnames": ["169.254.169.254"]}}
    p = compile_policy(allow_all, AGENT, dn)
    d = run(p, norm_host(spelling), port=80)
    assert not d.allow and d.rule == "EgressDenyPolicy/default/metadata"


def test_a_rule_spells_an_ip_in_its_canonical_form_and_is_told_which():
    dn = {"kind": "EgressDenyPolicy", "metadata": {"name": "lo"}, "spec": {"hostnames": ["0x7f000001"]}}
    with pytest.raises(ValueError, match="write '127.0.0.1'"):
        compile_policy({**GW, "spec": {"defaultPolicy": "allow-all"}}, AGENT, dn)


@pytest.mark.parametrize("path,allowed", [
    ("/repos/x", True), ("/repos/acme/public", True), ("/repos/%61cme/public", True),
    ("/repos/../user/keys", False), ("/repos/%2e%2e/user/keys", False), ("/repos%2F..%2Fuser", False),
    ("//user/keys", False), ("/repos/acme/%73ecret", False), ("/repos//acme/secret", False),
    ("/repos/acme/secret/../public", False),  # dot segments on a route limited by path: refused, not resolved
    ("/repos/acme/SECRET/x", False),  # deny rules compare paths case-insensitively
    ("/repos", False), ("/reposx/y", False),  # "/repos/" covers what lies below it, whole segments only
])
def test_paths_are_judged_as_the_server_would_read_them(path, allowed):
    from clrk.hostnames import normalize_path, path_ambiguity

    r = {"kind": "EgressRoute", "metadata": {"name": "gh"}, "spec": {"hostnames": ["api.github.com"], "paths": ["/repos/"]}}
    dn = {"kind": "EgressDenyPolicy", "metadata": {"name": "secret"},
          "spec": {"hostnames": ["api.github.com"], "paths": ["/repos/acme/secret"]}}
    p = compile_policy(GW, AGENT, r, dn)
    assert run(p, "api.github.com", path=normalize_path(path), path_ambiguity=path_ambiguity(path)).allow is allowed


@pytest.mark.parametrize("authority,hosts,path,method,expect", [
    ("", ["ok.com"], "/x", "GET", ("ok.com", 443, None)),
    ("", ["OK.com.:443"], "/x", "GET", ("ok.com", 443, None)),
    ("ok.com", [], "/x", "GET", ("ok.com", 443, None)),
    ("ok.com:8443", ["ok.com:8443"], "/x", "GET", ("ok.com", 8443, None)),
    ("", ["[::1]:443"], "/x", "GET", ("::1", 443, None)),
    ("", [], "/x", "GET", "names no host"),
    ("", ["ok.com", "ok.com"], "/x", "GET", "2 Host headers"),
    ("evil.com", ["ok.com"], "/x", "GET", "names two hosts"),
    ("", ["ok.com"], "https://evil.com/x", "GET", "is not a path"),
    ("", ["ok.com"], "//evil.com/x", "GET", "begins with '//'"),
    ("", ["ok.com"], "*", "OPTIONS", ("ok.com", 443, None)),
    ("", ["ok.com"], "*", "GET", "is not a path"),
    ("", ["ok.com/x"], "/x", "GET", "is not a host name"),
    ("", ["user@ok.com"], "/x", "GET", "is not a host name"),
    ("", ["ok.com:99999"], "/x", "GET", "is not a host name"),
])
def test_request_target(authority, hosts, path, method, expect):
    from clrk.hostnames import request_target

    got = request_target("ok.com", 443, authority, hosts, path, method)
    if isinstance(expect, tuple):
        assert got == expect
    else:
        assert got[:2] == (None, None) and expect in got[2]


@pytest.mark.parametrize("path,why", [
    ("/a/b", None), ("/a/%7Eb", None), ("/a/b?x=/../..;%2f", None), ("/a/b/", None),
    ("/a/../b", "dot segment"), ("/a/%2E%2e/b", "dot segment"), ("/a/.", "dot segment"), ("/a/%2e", "dot segment"),
    ("/a//b", "'//'"), ("/a\\b", "backslash"), ("/a;x/b", "';'"), ("/a%2Fb", "encoded '/'"), ("/a%5cb", "encoded '\\'"),
    ("/a%25b", "encoded '%'"), ("/a%00", "encoded NUL"), ("*", "not an absolute path"), ("http://x/y", "not an absolute path"),
    ("/a/\x7fb", "printable"), ("/a/ü", "printable"),
])
def test_path_ambiguity(path, why):
    from clrk.hostnames import path_ambiguity

    got = path_ambiguity(path)
    assert (got is None) if why is None else (why in got)


def test_path_facts_are_what_the_two_functions_say_and_their_memory_stays_bounded():
    """`path_facts` (what EgressControl calls per request) remembers paths; remembered or not, its answer is
    `normalize_path` and `path_ambiguity` of the path, whatever query follows it."""
    from clrk import hostnames
    from clrk.hostnames import normalize_path, path_ambiguity, path_facts

    paths = ["/a/b", "/a/%7Eb", "/a/../b", "/a//b", "/a;x/b", "*", "http://x/y", "/a/ü", "/v1/chat/completions",
             "/a/b#frag", "/" + "x" * 2000]
    for path in paths:
        for query in ("", "?q=/../..;%2f", "?"):
            for _ in range(2):  # worked out, then remembered
                assert path_facts(path + query) == (normalize_path(path + query), path_ambiguity(path + query))
    for i in range(hostnames.PATHS_MAX * 2):  # a flood of distinct paths
        assert path_facts(f"/flood/{i}/../x") == ("/flood/x", "it contains a dot segment ('.' or '..')")
    assert len(hostnames._PATHS) <= hostnames.PATHS_MAX
    assert all(len(p) <= hostnames.PATH_CACHED_MAX for p in hostnames._PATHS)


def test_header_names_are_judged_the_same_remembered_or_not_and_long_ones_are_never_kept():
    """A hostile agent chooses its header names: thousands of distinct ones, each as long as a request head
    allows, must not stay in the proxy's memory (a long name is judged every time, and the memory starts over)."""
    from clrk import memo
    from clrk.proxy import transaction

    for _ in range(2):
        assert transaction.scan_request_headers([(b"Host", b"a"), (b"X-Ok", b"1"), (b"Bad Name", b"2")]) == (
            {"host": "a", "x-ok": "1", "bad name": "2"}, ["a"], "the header name 'bad name' is not a valid token")
    for i in range(memo.LIMIT * 2):
        long = b"X-" + b"a" * 4096 + str(i).encode()
        assert transaction.header_index([(long, b"v")]) == {long.lower().decode(): "v"}
        transaction.header_index([(f"X-Short-{i}".encode(), b"v")])
    assert len(transaction._NAMES) <= memo.LIMIT
    assert all(len(name) <= memo.LONGEST for name in transaction._NAMES)


def test_loose_path_is_the_same_remembered_or_not_and_its_memory_stays_bounded():
    """`loose_path` (each provider parser asks it once per call) remembers paths: the answer is the same the second
    time, a flood of distinct paths does not grow the memory past its limit, and long paths are never kept."""
    import re

    from clrk import hostnames, memo
    from clrk.hostnames import loose_path, normalize_path

    def worked_out(p: str) -> str:
        return re.sub(r"/{2,}", "/", normalize_path(p))

    paths = ["/v1//chat/completions", "/v1/%2e%2e/batches", "/a/./b//", "//x", "/v1/messages/batches?x=1",
             "/" + "y" * 3000 + "//z", "/a/%7E/b"]
    for p in paths:
        first, second = loose_path(p), loose_path(p)
        assert first == second == worked_out(p)
    for i in range(memo.LIMIT * 2):
        assert loose_path(f"/flood//{i}/../x") == "/flood/x"
    assert len(hostnames._LOOSE) <= memo.LIMIT
    assert all(len(p) <= memo.LONGEST for p in hostnames._LOOSE)
