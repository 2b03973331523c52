"""What the README and `clrk ca` tell a user to set, run as a user would: the README's "Try it" block in bash
(with CURL_CA_BUNDLE and SSL_CERT_DIR already set, as on many machines), then curl, Python (requests, httpx)
and Node 20 with the official `openai` npm package through the gateway with that environment. Every call must
reach the fake upstream through the gateway and be recorded; a client that went around the gateway would
fail, since the only way to the fake provider is the gateway's hostAliases."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clrk import attributes as A
from tests.harness import fake_provider
from tests.harness.gateway import Gateway, gateway_doc, route
from tests.harness.util import new_invocation, wait_for

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "tests" / "node"
HOSTS = ["api.github.com", "pastebin.com", "api.openai.com"]
# What many machines have set already: curl prefers these to SSL_CERT_FILE.
SYSTEM_CA_ENV = {"CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt", "SSL_CERT_DIR": "/etc/ssl/certs"}


def readme_try_block() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"## Try it\n.*?```sh\n(.*?)```", text, re.S)
    assert m, "README.md has no sh block under 'Try it'"
    return m.group(1)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pki, upstream):
    """The repository's example agents and routes, behind a gateway whose upstreams are the fake ones."""
    fake_provider.install(upstream)
    examples = [d for f in ("agents.yaml", "routes.yaml") for d in yaml.safe_load_all((REPO / "policies" / f).read_text()) if d]
    docs = [gateway_doc(aliases={h: upstream.address for h in HOSTS}, ca_bundle=str(pki[0])), *examples,
            route("openai-for-team-a", ["api.openai.com"], sourceAgents={"namespaces": ["team-a"]})]
    g = Gateway(tmp_path_factory.mktemp("clients-gw"), docs).start()
    yield g
    g.stop()


def user_shell(gw, script: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`script` in bash, in a directory laid out as the repository is for a user (certs/ holding the CA,
    .venv/), with the README's port replaced by the test gateway's."""
    home = gw.dir
    if not (home / ".venv").exists():
        (home / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in
           ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", *SYSTEM_CA_ENV)}
    env.update(extra_env or {}, CLRK_DB=str(gw.db))
    script = script.replace("localhost:8080", f"localhost:{gw.port}")
    return subprocess.run(["bash", "-c", "set -eu\n" + script], cwd=home, env=env, capture_output=True, text=True, timeout=120)


def trust_lines() -> str:
    """The README's export lines: the agent's proxy and the CA trust for every client."""
    return "\n".join(line for line in readme_try_block().splitlines() if line.startswith(("export ", "CA=")))


@pytest.mark.parametrize("preset", [{}, {"CURL_CA_BUNDLE": SYSTEM_CA_ENV["CURL_CA_BUNDLE"]},
                                    {"SSL_CERT_DIR": SYSTEM_CA_ENV["SSL_CERT_DIR"]}, SYSTEM_CA_ENV],
                         ids=["clean", "curl-ca-bundle", "ssl-cert-dir", "both"])
def test_the_readme_try_block_runs_as_written(gw, upstream, preset):
    before = len(upstream.requests_to("/repos/python/cpython"))
    out = user_shell(gw, readme_try_block(), preset)
    assert out.returncode == 0, out.stderr
    assert '"path": "/repos/python/cpython"' in out.stdout  # the fake api.github.com answered, via the gateway
    assert '{"error": "clrk: pastebin is off limits"}' in out.stdout
    assert '{"error": "clrk: no route allows GET example.com:443/' in out.stdout
    assert len(upstream.requests_to("/repos/python/cpython")) == before + 1
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{\"time\"")]
    assert rows and all(r[A.AGENT_NAME] == "researcher" for r in rows)  # `clrk records --json --agent ...`
    assert {"api.github.com", "pastebin.com", "example.com"} <= {r[A.SERVER_ADDRESS] for r in rows}


def test_python_clients_follow_the_readme_environment(gw):
    inv = new_invocation("py")
    code = ("import httpx, requests, sys\n"
            "h = {'clrk-invocation-id': sys.argv[1]}\n"
            "print(requests.get('https://api.github.com/repos/a/b', headers=h).status_code)\n"
            "print(httpx.get('https://api.github.com/repos/a/b', headers=h).status_code)\n")
    out = user_shell(gw, f"{trust_lines()}\n{sys.executable} -c \"$PY\" {inv}", {**SYSTEM_CA_ENV, "PY": code})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["200", "200"]
    assert len(gw.wait_records(2, invocation=inv)) == 2


@pytest.fixture(scope="module")
def node():
    """node and tests/node's npm packages, installed by the project's own script when missing."""
    subprocess.run([str(REPO / "scripts" / "setup-node")], check=True, timeout=600)
    return "node"


@pytest.mark.parametrize("how", ["dispatcher", "global"])
def test_node_openai_sdk_through_the_gateway(gw, node, how):
    """Node 20's fetch ignores HTTPS_PROXY: the ways docs/CLIENTS.md gives for it, with the official SDK."""
    inv = new_invocation("node")
    out = user_shell(gw, f"{trust_lines()}\n{node} {NODE_DIR / 'openai_chat.mjs'} {how} {inv}", SYSTEM_CA_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout) == {"ok": True, "content": "Hello!", "model": "gpt-4o-mini-2024"}
    rec = gw.wait_record(invocation=inv)
    assert (rec[A.AGENT_NAMESPACE], rec[A.AGENT_NAME], rec[A.CLRK_DECISION]) == ("team-a", "researcher", "allow")
    assert (rec[A.GEN_AI_PROVIDER_NAME], rec[A.GEN_AI_OPERATION_NAME]) == ("openai", "chat")
    assert (rec[A.GEN_AI_REQUEST_MODEL], rec[A.GEN_AI_RESPONSE_MODEL]) == ("gpt-4o-mini", "gpt-4o-mini-2024")
    assert (rec[A.GEN_AI_USAGE_INPUT_TOKENS], rec[A.GEN_AI_USAGE_OUTPUT_TOKENS]) == (12, 5)
    assert rec[A.REQUEST_HEADERS]["authorization"] == A.REDACTED
    assert "sk-node-not-a-real-key" not in json.dumps(rec)


def test_clrk_ca_gives_the_readme_trust_line(gw):
    """`clrk ca` and the README tell the same story: the README's trust lines, with the CA's real path."""
    out = subprocess.run([str(Path(sys.executable).parent / "clrk"), "ca", "--certs", str(gw.certs), "--policies",
                          str(gw.policies)], capture_output=True, text=True, check=True).stdout
    readme = [line.split("#")[0].strip() for line in trust_lines().splitlines() if not line.startswith("export HTTPS_PROXY")]
    assert readme[0] == "CA=$PWD/certs/mitmproxy-ca-cert.pem" and len(readme) == 2
    ca = [line.strip() for line in out.splitlines()]
    assert f"CA={gw.ca.resolve()}" in ca and readme[1] in ca


def test_the_gateway_puts_a_policy_with_warnings_in_force_and_logs_them(gw):
    """A reference that leads nowhere makes no rule wider: the gateway loads the policy and logs why."""
    gw.write_policy([route("typo", ["api.github.com"], sourceAgents={"namespaces": ["team-q"]})], name="typo.yaml")
    try:
        gw.wait_log("spec.sourceAgents.namespaces[0]: no Agent is in namespace 'team-q'")
        assert "clrk: policy warning: " in gw.log() and "policy reload failed" not in gw.log()
    finally:
        reloads = gw.log().count("policy reloaded")
        (gw.policies / "typo.yaml").unlink()
        wait_for(lambda: gw.log().count("policy reloaded") > reloads, "the reload without typo.yaml")


def test_node_fetch_goes_around_the_gateway_without_a_dispatcher(gw, node, upstream):
    """Why docs/CLIENTS.md asks Node 20 for code: with HTTPS_PROXY (and NODE_USE_ENV_PROXY=1) set and nothing
    in code, Node's fetch connects straight to the provider. The provider here is the fake upstream's own
    port, which the gateway would never dial (an IP literal on loopback), so any connection it gets is direct.
    On a Node that honours NODE_USE_ENV_PROXY the call must go through the gateway instead (and be refused)."""
    version = tuple(int(x) for x in subprocess.run([node, "-p", "process.versions.node"], capture_output=True,
                                                    text=True, check=True).stdout.strip().split(".")[:2])
    honours_env = version >= (24, 5) or (22, 21) <= version < (23, 0)
    inv = new_invocation("node-env")
    before = upstream.connections
    env = {**SYSTEM_CA_ENV, "NODE_USE_ENV_PROXY": "1", "OPENAI_BASE_URL": f"https://127.0.0.1:{upstream.port}/v1"}
    out = user_shell(gw, f"{trust_lines()}\n{node} {NODE_DIR / 'openai_chat.mjs'} env {inv}", env)
    assert out.returncode == 1 and json.loads(out.stdout)["ok"] is False, out.stdout + out.stderr
    if honours_env:
        assert gw.wait_record(invocation=inv)[A.CLRK_DECISION] == "deny" and upstream.connections == before
    else:
        assert upstream.connections > before  # straight to the provider: the gateway never saw the call
        assert gw.records(invocation=inv) == []
