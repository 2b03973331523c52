"""The gateway as users run it, in its own process, on loopback: the process `clrk run` starts
(`python -O -m clrk.proxy`), or `mitmdump -s addons/clrk.py` (`entry="mitmdump"`)."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from clrk import wire
from clrk.launch import gateway_command
from clrk.recorder.store import fetch_records, open_readonly

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")

AGENT_TOKEN = "tok-researcher-0123456789"
OTHER_TOKEN = "tok-reviewer-9876543210"


def proxy_connect(port: int, target: str, proxy_authorization: str | None = None) -> tuple[socket.socket, bytes]:
    """Opens a CONNECT tunnel by hand (for tests that need exact bytes); returns the socket and the reply head."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if proxy_authorization is not None:
        head += f"Proxy-Authorization: {proxy_authorization}\r\n"
    s.sendall((head + "\r\n").encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    return s, reply


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_doc(*, endpoint: str = "", aliases: dict[str, str], ca_bundle: str, max_bytes: int = 4096,
                headers: dict | None = None, default: str = "deny-all") -> dict:
    return {
        "apiVersion": "clrk.apoxy.dev/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": "test-gw"},
        "spec": {
            "defaultPolicy": default,
            "otlp": {
                "endpoint": endpoint,
                "headers": headers or {},
                "captureBody": {"maxBytes": max_bytes},
            },
            "upstreamTLS": {"caBundle": ca_bundle, "hostAliases": aliases},
        },
    }


def agent_docs() -> list[dict]:
    return [
        {
            "apiVersion": "clrk.apoxy.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": "researcher", "namespace": "team-a", "labels": {"tier": "batch"}},
            "spec": {"kind": "TaskAgent", "uid": "uid-7d1c", "revision": "3", "credentials": {"tokenSha256": sha(AGENT_TOKEN)}},
        },
        {
            "apiVersion": "clrk.apoxy.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": "reviewer", "namespace": "team-b"},
            "spec": {"kind": "ReviewAgent", "credentials": {"tokenFrom": {"env": "CLRK_TEST_REVIEWER_TOKEN"}}},
        },
    ]


def route(name: str, hostnames: list[str], **spec) -> dict:
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressRoute", "metadata": {"name": name},
            "spec": {"hostnames": hostnames, **spec}}


def deny(name: str, hostnames: list[str], **spec) -> dict:
    return {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressDenyPolicy", "metadata": {"name": name},
            "spec": {"hostnames": hostnames, **spec}}


class Gateway:
    def __init__(self, workdir: Path, docs: list[dict], *, fallback: str = "", env: dict | None = None,
                 mitmproxy_args: list[str] | None = None, wrapper: list[str] | None = None, entry: str = "clrk"):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policies = self.dir / "policies"
        self.policies.mkdir(exist_ok=True)
        self.db = self.dir / "data" / "clrk.duckdb"
        self.certs = self.dir / "certs"
        self.port = free_port()
        self.fallback = fallback
        self.mitmproxy_args = list(mitmproxy_args or [])
        self.wrapper = list(wrapper or [])  # a command the gateway runs under (e.g. in its own mount namespace)
        self.entry = entry
        self.env = {**os.environ, "CLRK_TEST_REVIEWER_TOKEN": OTHER_TOKEN, **(env or {})}
        self.write_policy(docs)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "gateway.log"

    def write_policy(self, docs: list[dict], name: str = "policy.yaml") -> None:
        tmp = self.policies / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        os.replace(tmp, self.policies / name)

    @property
    def ca(self) -> Path:
        return self.certs / "mitmproxy-ca-cert.pem"

    def start(self, timeout: float = 30.0) -> Gateway:
        command = [MITMDUMP, "-s", str(REPO / "addons" / "clrk.py")] if self.entry == "mitmdump" else gateway_command()
        argv = [*command, "--listen-host", "127.0.0.1", "-p", str(self.port),
                "--set", f"clrk_policies={self.policies}", "--set", f"clrk_db={self.db}",
                "--set", f"clrk_certs={self.certs}"]
        if self.fallback:
            argv += ["--set", f"clrk_dev_otlp_fallback_endpoint={self.fallback}"]
        argv = self.wrapper + argv + self.mitmproxy_args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        sock = wire.socket_path(self.db)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if "proxy listening" in self.log() and self.ca.exists() and wire.recorder_ready(sock):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        # The recorder exits once it has flushed; wait for its lock on the file to go.
        deadline = time.monotonic() + timeout
        while os.path.exists(wire.socket_path(self.db)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return rc

    def proxy_url(self, user: str = "team-a.researcher", token: str = AGENT_TOKEN) -> str:
        return f"http://{user}:{token}@127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, user: str = "team-a.researcher", token: str = AGENT_TOKEN, **kw) -> httpx.Client:
        return httpx.Client(proxy=self.proxy_url(user, token), verify=self.ssl_context(), trust_env=False, timeout=30, **kw)

    def records(self, **query) -> list[dict]:
        query.setdefault("limit", 0)
        sock = wire.socket_path(self.db)
        if self.proc is not None and self.proc.poll() is None:
            with wire.BlockingClient(sock) as c:
                return c.request({"t": "query", "query": query})["rows"]
        con = open_readonly(self.db)
        try:
            return fetch_records(con, query)
        finally:
            con.close()

    def wait_record(self, timeout: float = 10.0, **query) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.records(**query)
            if rows:
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"no record matching {query}; gateway log:\n{self.log()[-3000:]}")
