"""Policy loading: every contract kind validates; errors name file, document and field path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clrk.policy import PolicyError, load_policy
from clrk.policy.loader import json_schema

REPO = Path(__file__).resolve().parents[1]
CLRK = str(Path(sys.executable).parent / "clrk")

FULL_CONTRACT = """
kind: EgressGateway
metadata: {name: prod-agents}
spec:
  defaultPolicy: deny-all
  listeners:
  - {name: tls-out, port: 8080, protocol: TLS, tls: {mode: Terminate}}
  otlp:
    endpoint: "https://api.honeycomb.io"
    headers: {x-honeycomb-team: "${HONEYCOMB_API_KEY}"}
    captureBody:
      maxBytes: 65536
      includeContentTypes: [application/json, application/x-ndjson, text/event-stream]
  upstreamTLS:
    hostAliases: {api.openai.com: "127.0.0.1:9443"}
---
kind: Agent
metadata: {name: researcher, namespace: team-a, labels: {tier: batch}}
spec:
  kind: TaskAgent
  uid: 7d1c
  revision: "3"
  credentials:
    tokenSha256: "%s"
---
kind: EgressRoute
metadata: {name: github-read}
spec:
  hostnames: ["api.github.com", "*.pythonhosted.org"]
  ports: [443]
  methods: [GET]
  paths: ["/repos/"]
  sourceAgents: {namespaces: [team-a], names: [], matchLabels: {}}
---
kind: EgressDenyPolicy
metadata: {name: no-paste}
spec:
  hostnames: ["pastebin.com"]
  sourceAgents: {}
  denyResponse: {statusCode: 403, message: "pastebin is off limits"}
---
kind: AIProviderRoute
metadata: {name: openai-chat, namespace: team-a}
spec:
  sourceAgents: {namespaces: [team-a]}
  rules:
  - matches:
    - provider: openai
      models: ["gpt-4o*"]
      endpoints: ["/v1/chat/completions", "/v1/responses"]
    backendRefs: [{name: openai-main}]
    filters:
    - type: TokenBudget
      tokenBudget: {maxTokensPerDay: 200000, scope: Agent}
---
kind: Backend
metadata: {name: openai-main}
spec:
  schema: {name: openai}
  upstream: {host: api.openai.com, port: 443}
  modelRewrites: [{from: "gpt-4o", to: "gpt-4o-mini"}]
  bodyMutation: {ensureStreamUsage: true}
---
kind: CredentialInjectionPolicy
metadata: {name: openai-key}
spec:
  targetRefs: [{kind: AIProviderRoute, name: openai-chat}]
  target: {type: Header, name: Authorization, prefix: "Bearer "}
  secretRef: {env: OPENAI_API_KEY}
""" % ("ab" * 32)


def write(tmp_path, text, name="p.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path


def test_every_contract_kind_loads(tmp_path):
    p = load_policy(write(tmp_path, FULL_CONTRACT), env={"HONEYCOMB_API_KEY": "hc-key", "OPENAI_API_KEY": "sk-x"})
    kinds = sorted({sd.doc.kind for sd in p.documents})
    assert kinds == sorted(["EgressGateway", "Agent", "EgressRoute", "EgressDenyPolicy", "AIProviderRoute", "Backend",
                            "CredentialInjectionPolicy"])
    g = p.gateways[0]
    assert g.otlp_headers == {"x-honeycomb-team": "hc-key"}
    assert g.host_aliases == {"api.openai.com": ("127.0.0.1", 9443)}
    assert "authorization" in p.redact_headers
    assert p.listener_ports() == [8080]


def test_unset_variable_and_secret_are_startup_errors(tmp_path):
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, FULL_CONTRACT), env={})
    msg = str(e.value)
    assert "HONEYCOMB_API_KEY is not set" in msg and "spec.otlp.headers.x-honeycomb-team" in msg
    assert "OPENAI_API_KEY is not set" in msg and "spec.secretRef" in msg


def test_errors_name_file_document_and_field_path(tmp_path):
    text = FULL_CONTRACT.replace("ports: [443]", "ports: [70000]").replace("statusCode: 403", "statusCode: 200")
    text = text.replace("tokenSha256: \"" + "ab" * 32, "tokenSha256: \"nothex")
    text = text.replace("backendRefs: [{name: openai-main}]", "backendRefs: [{name: nope}]")
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, text), env={"HONEYCOMB_API_KEY": "k", "OPENAI_API_KEY": "k"})
    problems = e.value.problems
    f = str(tmp_path / "p.yaml")
    # file:line:column of the value in error, as compilers say it
    assert any(p.startswith(f"{f}:30:11: document 3 (EgressRoute github-read): spec.ports[0]:") for p in problems), problems
    assert any(p.startswith(f"{f}:40:30: document 4 (EgressDenyPolicy no-paste): spec.denyResponse.statusCode:") for p in problems)
    assert any(p.startswith(f"{f}:24:18: document 2 (Agent researcher): spec.credentials.tokenSha256:") for p in problems)


def test_cross_references_are_checked(tmp_path):
    text = FULL_CONTRACT.replace("backendRefs: [{name: openai-main}]", "backendRefs: [{name: nope}]")
    text = text.replace("targetRefs: [{kind: AIProviderRoute, name: openai-chat}]", "targetRefs: [{kind: AIProviderRoute, name: ghost}]")
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, text), env={"HONEYCOMB_API_KEY": "k", "OPENAI_API_KEY": "k"})
    f = tmp_path / "p.yaml"
    lines = text.splitlines()
    # Each problem says where the reference was written: file:line:column.
    for problem, target in (("spec.rules[0].backendRefs[0].name: no Backend named 'nope'", "nope"),
                            ("spec.targetRefs[0].name: no AIProviderRoute named 'ghost'", "ghost")):
        (found,) = [p for p in e.value.problems if problem in p]
        line, col = map(int, found.removeprefix(f"{f}:").split(":")[:2])
        assert lines[line - 1][col - 1:].startswith(target), (found, lines[line - 1])


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("kind: EgressRoute\nmetadata: {name: a}\nspec: {hostnames: [a.com], hostnamez: [b.com]}\n",
         "p.yaml:3:28: document 1 (EgressRoute a): spec.hostnamez: unknown field"),
        ("kind: EgressRoute\nmetadata: {name: a}\nspec:\n  hostnames: [a.com]\n  hostnames: [b.com]\n",
         "p.yaml:5:3: invalid YAML: duplicate key 'hostnames'"),
        ("kind: EgressRoute\nmetadata: {name: a}\nspec: {ports: [443]}\n",
         "p.yaml:3:7: document 1 (EgressRoute a): spec: set hostnames, cidrs or both"),
        ("kind: EgressRoute\nmetadata: {name: a}\n", "p.yaml:1:1: document 1 (EgressRoute a): spec: Field required"),
        ("kind: Wat\nmetadata: {name: a}\n", "kind: unknown kind"),
        ("kind: EgressRoute\nmetadata: {name: a}\nspec: {hostnames: ['bad host']}\n", "'bad host' is not a hostname"),
        ("- just\n- a list\n", "expected a mapping"),
        ("kind: EgressRoute\nmetadata: {name: a\n", "p.yaml:3:1: invalid YAML: expected ',' or '}', but got '<stream end>'"),
        ("kind: EgressRoute\nmetadata:\n  name: a\n   bad: indent\n", "p.yaml:4:7: invalid YAML: mapping values are not allowed here"),
        ("kind: EgressGateway\nmetadata: {name: g}\nspec: {upstreamTLS: {hostAliases: {a.com: '" + "x" * 64 + ".test:443'}}}\n",
         "labels of at most 63 characters"),
        ("kind: Backend\nmetadata: {name: b}\nspec: {schema: {name: openai}, upstream: {host: '" + ".".join(["y" * 60] * 5) + "'}}\n",
         "253 in all"),
        ("apiVersion: v2\nkind: EgressRoute\nmetadata: {name: a}\nspec: {hostnames: [a.com]}\n", "apiVersion: must be clrk.apoxy.dev/v1alpha1"),
    ],
)
def test_bad_documents(tmp_path, text, fragment):
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, text))
    assert fragment in str(e.value)


def test_capture_redaction_additions_are_validated_at_load(tmp_path):
    text = ("kind: EgressGateway\nmetadata: {name: g}\nspec:\n  otlp:\n    captureBody:\n      redact:\n"
            "        headers: [X-Wallet-Id, 'not a header']\n        queryParams: [otp, '  ']\n"
            "        jsonPaths: ['$.vault.*', '$..pin', 'credentials', '$.a[?(@.b)]']\n")
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, text))
    where = f"{tmp_path / 'p.yaml'}: document 1 (EgressGateway g): spec.otlp.captureBody.redact"
    problems = [re.sub(r"^(.*?p\.yaml):\d+:\d+:", r"\1:", p) for p in e.value.problems]  # positions: test_bad_documents
    assert f"{where}.headers[1]: 'not a header' is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)" in problems
    assert f"{where}.queryParams[1]: a query parameter name may not be empty" in problems
    assert any(p.startswith(f"{where}.jsonPaths[1]: '$..pin': recursive descent") for p in problems), problems
    assert any(p.startswith(f"{where}.jsonPaths[2]: 'credentials' must start with '$'") for p in problems), problems
    assert any(p.startswith(f"{where}.jsonPaths[3]: '$.a[?(@.b)]': cannot read '[?(@.b)]'; supported: $, .name") for p in problems)
    assert len(problems) == 5  # the good entries are fine

    good = text.replace(", 'not a header'", "").replace(", '  '", "").replace(", '$..pin', 'credentials', '$.a[?(@.b)]'", "")
    r = load_policy(write(tmp_path, good)).gateways[0].redactor
    assert r.header("x-wallet-id") and r.query_param("otp") and r.json_paths == (("vault", None),)
    assert r.header("authorization") and r.query_param("code")  # added to the defaults, never replacing them


def test_no_gateway_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="no EgressGateway"):
        load_policy(write(tmp_path, "kind: EgressRoute\nmetadata: {name: a}\nspec: {hostnames: [a.com]}\n"))


def test_agent_token_from_file_and_env(tmp_path):
    (tmp_path / "tok").write_text("s3cret-token\n")
    text = ("kind: EgressGateway\nmetadata: {name: g}\n---\n"
            "kind: Agent\nmetadata: {name: a}\nspec: {credentials: {tokenFrom: {file: tok}}}\n---\n"
            "kind: Agent\nmetadata: {name: b}\nspec: {credentials: {tokenFrom: {env: TOK_B}}}\n")
    import hashlib

    p = load_policy(write(tmp_path, text), env={"TOK_B": "bee"})
    assert p.agents["default.a"][1] == hashlib.sha256(b"s3cret-token").digest()
    assert p.agents["default.b"][1] == hashlib.sha256(b"bee").digest()


def test_example_policies_pass_the_cli_check():
    out = subprocess.run([CLRK, "policy", "check", str(REPO / "policies")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok (" in out.stdout


def test_cli_check_reports_problems_and_fails(tmp_path):
    write(tmp_path, "kind: EgressRoute\nmetadata: {name: a}\nspec: {hostnames: []}\n")
    out = subprocess.run([CLRK, "policy", "check", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "document 1 (EgressRoute a): spec: set hostnames, cidrs or both" in out.stderr


def test_schema_is_json_schema_with_yaml_names():
    out = subprocess.run([CLRK, "policy", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    text = out.stdout
    for name in ("defaultPolicy", "hostAliases", "upstreamTLS", "tokenSha256", "sourceAgents", "maxTokensPerDay", "ensureStreamUsage"):
        assert f'"{name}"' in text


def test_ai_provider_example_checks_with_the_example_policies(tmp_path):
    import shutil

    for f in (REPO / "policies").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(REPO / "docs" / "examples" / "ai-providers.yaml", tmp_path / "ai-providers.yaml")
    p = load_policy(tmp_path, env={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x"})
    assert [r.ref for r in p.provider_rules] == ["AIProviderRoute/team-a/openai#rules[0]", "AIProviderRoute/team-a/anthropic#rules[0]"]
    assert [i.field for i in p.injections_for("AIProviderRoute", "anthropic", "team-a")] == ["x-api-key"]
    assert p.provider_rules[0].budget.per_agent and p.provider_rules[0].backends[0][0].model_rewrites == (("gpt-4o", "gpt-4o-mini"),)
    assert p.provider_rules[0].budget.max_cost_per_day == 5.0
    assert p.pricing.cost_of("openai", "gpt-4.1-2025-04-14", 1_000_000, 0) == (1.8, "policy")


# ------------------------------------------------------------------------------------------ fuzzing

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=30))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
_KINDS = ["EgressGateway", "Agent", "EgressRoute", "EgressDenyPolicy", "AIProviderRoute", "Backend", "CredentialInjectionPolicy",
          "ModelPricing", "Nope"]
_FIELDS = ["hostnames", "ports", "methods", "paths", "sourceAgents", "credentials", "rules", "matches", "upstream", "schema",
           "targetRefs", "target", "secretRef", "otlp", "listeners", "upstreamTLS", "denyResponse", "filters", "modelRewrites",
           "models"]
_docs = st.fixed_dictionaries(
    {"kind": st.sampled_from(_KINDS), "metadata": st.fixed_dictionaries({"name": st.text(max_size=20)}) | _values},
    optional={"apiVersion": st.sampled_from(["clrk.apoxy.dev/v1alpha1", "v2"]) | st.text(max_size=5),
              "spec": st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=5) | _values},
)


@given(docs=st.lists(_docs, max_size=4))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_document_is_a_policy_or_a_policy_error(tmp_path_factory, docs):
    import yaml

    d = tmp_path_factory.mktemp("fuzz")
    (d / "p.yaml").write_text(yaml.safe_dump_all(docs))
    try:
        load_policy(d, env={})
    except PolicyError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@given(text=st.text(max_size=400))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_is_a_policy_or_a_policy_error(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("fuzztext")
    (d / "p.yaml").write_text(text)
    try:
        load_policy(d, env={})
    except PolicyError:
        pass


TYPOS = """
kind: EgressGateway
metadata: {name: g}
---
kind: Agent
metadata: {name: researcher, namespace: team-a, labels: {tier: batch}}
spec: {credentials: {tokenSha256: "HASH_A"}}
---
kind: Agent
metadata: {name: reviewer, namespace: team-b}
spec: {credentials: {tokenSha256: "HASH_B"}}
---
kind: EgressRoute
metadata: {name: typo-ns}
spec: {hostnames: [a.com], sourceAgents: {namespaces: [team-a, team-q]}}
---
kind: EgressRoute
metadata: {name: typo-names}
spec: {hostnames: [a.com], sourceAgents: {names: [researcher, reseacher, team-b/researcher, team-b/reviewer]}}
---
kind: EgressDenyPolicy
metadata: {name: typo-label}
spec: {hostnames: [b.com], sourceAgents: {matchLabels: {tier: btach}}}
---
kind: AIProviderRoute
metadata: {name: nobody-together, namespace: team-a}
spec:
  sourceAgents: {namespaces: [team-a], names: [reviewer]}
  rules: [{matches: [{provider: openai}]}]
---
kind: AIProviderRoute
metadata: {name: fine, namespace: team-a}
spec:
  sourceAgents: {namespaces: [team-a], matchLabels: {tier: batch}}
  rules: [{matches: [{provider: anthropic}]}]
---
kind: CredentialInjectionPolicy
metadata: {name: key}
spec:
  targetRefs: [{kind: AIProviderRoute, name: fine, namespace: team-b}, {kind: AIProviderRoute, name: fine, namespace: team-a}]
  target: {type: Header, name: x-api-key}
  secretRef: {env: KEY}
""".replace("HASH_A", "ab" * 32).replace("HASH_B", "cd" * 32)


def test_references_that_lead_nowhere_are_warnings_naming_the_line(tmp_path):
    p = load_policy(write(tmp_path, TYPOS), env={"KEY": "k"})  # valid: in force all the same
    f = str(tmp_path / "p.yaml")
    assert list(p.warnings) == [  # file:line:column of the entry that leads nowhere
        f"{f}:15:64: document 4 (EgressRoute typo-ns): spec.sourceAgents.namespaces[1]: no Agent is in namespace 'team-q'",
        f"{f}:19:63: document 5 (EgressRoute typo-names): spec.sourceAgents.names[1]: no Agent is named 'reseacher' (in any namespace)",
        f"{f}:19:74: document 5 (EgressRoute typo-names): spec.sourceAgents.names[2]: no Agent is named 'team-b/researcher'",
        f"{f}:23:63: document 6 (EgressDenyPolicy typo-label): spec.sourceAgents.matchLabels.tier: no Agent has the label tier=btach",
        f"{f}:28:17: document 7 (AIProviderRoute nobody-together): spec.sourceAgents: no Agent matches namespaces, names and "
        "matchLabels together, so the rule applies to no agent",
        f"{f}:40:63: document 9 (CredentialInjectionPolicy key): spec.targetRefs[0].namespace: no AIProviderRoute named 'fine' in "
        "namespace 'team-b' (nothing is injected for this target)",
    ]
    lines = TYPOS.splitlines()
    assert lines[15 - 1][64 - 1:].startswith("team-q") and lines[19 - 1][63 - 1:].startswith("reseacher")
    assert lines[23 - 1][63 - 1:].startswith("btach") and lines[40 - 1][63 - 1:].startswith("team-b")

def test_cli_check_prints_warnings_and_fails_on_them_with_strict(tmp_path):
    write(tmp_path, TYPOS)
    env = {**os.environ, "KEY": "k"}
    out = subprocess.run([CLRK, "policy", "check", str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("; 6 warnings")
    assert out.stderr.count("warning: ") == 6 and "no Agent is in namespace 'team-q'" in out.stderr
    strict = subprocess.run([CLRK, "policy", "check", "--strict", str(tmp_path)], capture_output=True, text=True, env=env)
    assert strict.returncode == 1 and strict.stderr == out.stderr
    clean = subprocess.run([CLRK, "policy", "check", "--strict", str(REPO / "policies")], capture_output=True, text=True)
    assert clean.returncode == 0 and clean.stderr == "" and "warning" not in clean.stdout
