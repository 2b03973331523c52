"""`clrk demo`: the AI features in a minute, with no provider key and no network.

Starts a local fake provider (`clrk.demo.provider`) and a gateway (the process `clrk run` starts) whose policy,
written to a fresh directory, puts that provider behind a Backend, injects its key, and gives the agent a
small daily token budget. Then sends OpenAI, Anthropic and Gemini calls through the gateway with the official
SDKs, configured as an agent would be (HTTPS_PROXY, the gateway's CA), the last of them over budget, and prints
what `clrk spend` and `clrk records` show.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from clrk import wire
from clrk.cli.demo.pki import make_upstream_pki
from clrk.cli.demo.provider import PROVIDER_KEY, DemoProvider
from clrk.launch import gateway_argv, stop_gateway

AGENT = ("demo", "agent")
AGENT_TOKEN = "demo-token"
BUDGET = 2000
PROVIDER_HOSTS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"]
BACKEND_HOST = "llm.demo.internal"  # where the Backend sends OpenAI calls (the fake provider, by hostAliases)
KEY_ENV = "CLRK_DEMO_PROVIDER_KEY"


def _doc(kind: str, name: str, spec: dict, namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def policy_documents(port: int, provider_address: str, ca_bundle: str) -> list[dict]:
    """The demo's policy: one agent, a route per provider, OpenAI behind a Backend with an injected key and a
    daily budget, every provider host (and the Backend's) led to the fake provider."""
    ns, name = AGENT
    aliases = {h: provider_address for h in [*PROVIDER_HOSTS, BACKEND_HOST]}
    return [
        _doc("EgressGateway", "demo", {
            "defaultPolicy": "deny-all",
            "listeners": [{"name": "demo", "port": port}],
            "upstreamTLS": {"caBundle": ca_bundle, "hostAliases": aliases},
        }),
        _doc("Agent", name, {"kind": "DemoAgent", "credentials": {"tokenSha256": hashlib.sha256(AGENT_TOKEN.encode()).hexdigest()}},
             namespace=ns),
        _doc("Backend", "local-llm", {
            "schema": {"name": "openai"},
            "upstream": {"host": BACKEND_HOST, "port": 443},
            "modelRewrites": [{"from": "gpt-4o", "to": "gpt-4o-mini"}],
            "bodyMutation": {"ensureStreamUsage": True},
        }),
        _doc("AIProviderRoute", "openai", {
            "sourceAgents": {"namespaces": [ns]},
            "rules": [{
                "matches": [{"provider": "openai", "models": ["gpt-4o*"], "endpoints": ["/v1/chat/completions"]}],
                "backendRefs": [{"name": "local-llm"}],
                "filters": [{"type": "TokenBudget", "tokenBudget": {"maxTokensPerDay": BUDGET, "scope": "Agent"}}],
            }],
        }, namespace=ns),
        _doc("CredentialInjectionPolicy", "openai-key", {
            "targetRefs": [{"kind": "AIProviderRoute", "name": "openai"}],
            "target": {"type": "Header", "name": "Authorization", "prefix": "Bearer "},
            "secretRef": {"env": KEY_ENV},
        }),
        _doc("AIProviderRoute", "anthropic", {
            "sourceAgents": {"namespaces": [ns]}, "rules": [{"matches": [{"provider": "anthropic", "models": ["claude-*"]}]}],
        }, namespace=ns),
        _doc("AIProviderRoute", "gemini", {
            "sourceAgents": {"namespaces": [ns]}, "rules": [{"matches": [{"provider": "google_genai", "models": ["gemini-*"]}]}],
        }, namespace=ns),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Demo:
    def __init__(self, workdir: Path, port: int | None = None, out=None):
        self.dir = workdir
        self.port = port or _free_port()
        self.out = out or sys.stdout
        self.policies = self.dir / "policies"
        self.db = self.dir / "data" / "clrk.duckdb"
        self.certs = self.dir / "certs"
        self.log_path = self.dir / "gateway.log"
        self.provider: DemoProvider | None = None
        self.proc: subprocess.Popen | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ------------------------------------------------------------------ set-up

    def start(self, timeout: float = 30.0) -> None:
        from clrk.proxy.ca import ensure_ca

        ca, server_pem = make_upstream_pki(self.dir / "provider", [*PROVIDER_HOSTS, BACKEND_HOST])
        self.provider = DemoProvider(server_pem).start()
        self.policies.mkdir(parents=True, exist_ok=True)
        docs = policy_documents(self.port, f"127.0.0.1:{self.provider.port}", str(ca))
        (self.policies / "demo.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        ensure_ca(str(self.certs))
        argv = gateway_argv(str(self.policies), str(self.db), str(self.certs), [self.port], "127.0.0.1", "", [])
        env = {**os.environ, KEY_ENV: PROVIDER_KEY}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        sock = wire.socket_path(str(self.db))
        while not (wire.recorder_ready(sock) and _listening(self.port)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with status {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_gateway(self.proc)
        if self.proc is not None:
            self._log.close()
        if self.provider is not None:
            self.provider.stop()

    # ------------------------------------------------------------------ the agent

    def agent_environment(self) -> dict[str, str]:
        """What an agent sets (`clrk ca` prints the same): the proxy with its credentials, the gateway's CA."""
        ns, name = AGENT
        ca = str((self.certs / "mitmproxy-ca-cert.pem").resolve())
        return {"HTTPS_PROXY": f"http://{ns}.{name}:{AGENT_TOKEN}@127.0.0.1:{self.port}", "SSL_CERT_FILE": ca,
                "REQUESTS_CA_BUNDLE": ca}

    def calls(self) -> None:
        """The agent's calls, through the gateway with the official SDKs."""
        try:
            import anthropic
            import openai
            from google import genai
            from google.genai import types
        except ImportError as e:
            raise RuntimeError(f"the demo's agent uses the official SDKs: {e.name} is missing "
                               "(pip install openai anthropic google-genai, or scripts/setup)") from None
        for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
            os.environ.pop(var, None)
        os.environ.update(self.agent_environment())
        msgs = [{"role": "user", "content": "Say hello to the new clrk user."}]

        # The agent holds no provider key: the gateway injects OpenAI's, the fake ones below stand for others.
        oai = openai.OpenAI(api_key="sk-the-agent-has-no-key", max_retries=0)
        self.say("1. OpenAI chat (openai SDK), model gpt-4o: the Backend local-llm serves it as gpt-4o-mini, "
                 "with the key the gateway injects")
        r = oai.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=200)
        self.say(f"   -> {r.choices[0].message.content!r}  ({r.usage.prompt_tokens} in, {r.usage.completion_tokens} out)")

        self.say("2. OpenAI chat, streamed: the gateway asks for usage in the stream (ensureStreamUsage) and "
                 "passes each event on at once")
        text = "".join(c.choices[0].delta.content or "" for c in
                       oai.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=200, stream=True)
                       if c.choices)
        self.say(f"   -> {text!r}")

        self.say("3. Anthropic messages (anthropic SDK), model claude-sonnet-4-5")
        a = anthropic.Anthropic(api_key="sk-ant-demo-placeholder", max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=200, messages=msgs)
        self.say(f"   -> {a.content[0].text!r}  ({a.usage.input_tokens} in, {a.usage.output_tokens} out)")

        self.say("4. Gemini generateContent (google-genai SDK), model gemini-2.5-flash")
        g = genai.Client(api_key="AIza-demo-placeholder",
                         http_options=types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1)))
        out = g.models.generate_content(model="gemini-2.5-flash", contents="Say hello to the new clrk user.")
        self.say(f"   -> {out.text!r}")

        before = self.provider.calls if self.provider else 0
        self.say(f"5. OpenAI chat asking for up to 5000 output tokens, more than the agent's budget of {BUDGET} "
                 "tokens a day")
        try:
            oai.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=5000)
            self.say("   -> answered (unexpected: the budget should have refused it)")
        except openai.APIStatusError as e:
            reached = (self.provider.calls if self.provider else 0) - before
            self.say(f"   -> {e.status_code} from the gateway: {_error_message(e)}")
            self.say(f"      (refused before any upstream contact: {reached} request(s) reached the provider)")

    # ------------------------------------------------------------------ what the gateway saw

    def _query(self, query: dict) -> list[dict]:
        with wire.BlockingClient(wire.socket_path(str(self.db)), timeout=10) as c:
            return c.request({"t": "query", "query": query})["rows"]

    def wait_stored(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._query({"limit": 0})) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    def show(self) -> None:
        """What `clrk spend` and `clrk records` print (run as commands, as a user would), and one record's
        gen_ai attributes."""
        for argv in (["spend", "--by", "agent,route,model", "--budgets"], ["records"]):
            self.say(f"\n$ clrk {' '.join(argv)} --db {self.db}")
            cmd = subprocess.run([sys.executable, "-c", "from clrk.cli import main; main()", *argv, "--db", str(self.db)],
                                 capture_output=True, text=True, timeout=60)
            self.say((cmd.stdout + cmd.stderr).rstrip())
        first = self._query({"host": BACKEND_HOST, "limit": 0})[-1:]
        if first:
            self.say("\nThe gen_ai attributes of call 1 (clrk records --json; in the OTLP span too):")
            for k, v in sorted(first[0].items()):
                if k.startswith("gen_ai.") and v is not None:
                    self.say(f"  {k:44} {v}")


def _error_message(e) -> str:
    """The gateway's message from an SDK's status error, in clrk's form or a provider's."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message")
    return str(body or e)


def run(keep: bool = False, port: int | None = None, workdir: str | None = None) -> int:
    """The whole demo; returns the process exit status."""
    made = workdir is None
    d = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="clrk-demo-"))
    d.mkdir(parents=True, exist_ok=True)
    demo = Demo(d, port)
    t0 = time.monotonic()
    demo.say(f"clrk demo: a gateway and a fake model provider on 127.0.0.1, in {d} (no provider key, no network)")
    try:
        demo.start()
        demo.say(f"  gateway on 127.0.0.1:{demo.port}, policy {demo.policies / 'demo.yaml'}")
        demo.say(f"  the agent: HTTPS_PROXY=http://{AGENT[0]}.{AGENT[1]}:{AGENT_TOKEN}@127.0.0.1:{demo.port}, "
                 f"SSL_CERT_FILE={demo.certs / 'mitmproxy-ca-cert.pem'}\n")
        demo.calls()
        demo.wait_stored(5)
        demo.show()
    except Exception as e:
        demo.say(f"\nclrk demo failed: {e}\n(the gateway's log: {demo.log_path})")
        keep = True
        return 1
    finally:
        demo.stop()
        if made and not keep:
            shutil.rmtree(d, ignore_errors=True)
    where = f"kept in {d}" if keep or not made else f"{d} removed (--keep keeps it)"
    demo.say(f"\nclrk demo: done in {time.monotonic() - t0:.0f} s; {where}.")
    return 0
