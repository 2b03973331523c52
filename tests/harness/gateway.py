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

import h2.config
import h2.connection
import h2.events
import httpx
import yaml

from clrk import storeref, wire
from clrk.launch import gateway_command
from clrk.recorder.stores import ReadOnly

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


def connect(port: int, target: str, user: str = "team-a.researcher", token: str = AGENT_TOKEN) -> socket.socket:
    """A CONNECT tunnel the gateway accepted (200), as the agent `user`; the raw socket, nothing sent yet."""
    s, head = proxy_connect(port, target, basic(user, token))
    assert head, "the gateway closed the connection instead of answering the CONNECT"
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def tunnel(gw: Gateway, target: str = "allowed.test:443", sni: str | None = "allowed.test",
           alpn: list[str] | None = None) -> ssl.SSLSocket:
    """An accepted CONNECT to `target`, then TLS with the gateway's CA, naming `sni` (None: no server name, as
    clients do for an IP address) and offering `alpn`. The SNI is given on its own: tests make it disagree."""
    s = connect(gw.port, target)
    ctx = gw.ssl_context()
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(s, server_hostname=sni)


def read_all(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything `s` receives until the peer closes (or resets, or `timeout` seconds pass with nothing)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, OSError):
        pass
    return out


def _tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(bytes sent and not yet acknowledged, bytes received and not yet read) of the IPv4 TCP socket with these
    ends, from /proc/net/tcp; None when there is no such socket."""
    def key(addr: tuple[str, int]) -> str:
        ip = socket.inet_aton(addr[0])[::-1].hex().upper()
        return f"{ip}:{addr[1]:04X}"

    want = (key(local), key(remote))
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def wait_read_by_peer(s: socket.socket, timeout: float = 10.0) -> None:
    """Returns once everything sent on `s` (a loopback connection) has been read by the process at the other
    end: the gateway has taken in this piece on its own, and what is sent next arrives as another piece."""
    ours, theirs = s.getsockname()[:2], s.getpeername()[:2]
    deadline = time.monotonic() + timeout
    while True:
        mine, peer = _tcp_queues(ours, theirs), _tcp_queues(theirs, ours)
        if mine is not None and peer is not None and mine[0] == 0 and peer[1] == 0:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"the gateway did not read what was sent on {ours} within {timeout:g} s "
                                 f"(unacknowledged, unread: {mine}, {peer})")
        time.sleep(0.01)


def read_response(s: socket.socket, timeout: float = 10) -> bytes:
    """One whole HTTP/1 response from `s`: its head and the Content-Length body after it (what arrives early
    of anything after that is returned too)."""
    s.settimeout(timeout)
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def exchange(gw: Gateway, raw: bytes, *, hang_up_after_answer: bool = False, **tunnel_kw) -> bytes:
    """Sends exactly `raw` through a fresh tunnel (see `tunnel`) and returns all the gateway answers, up to
    its closing the connection. `hang_up_after_answer`: once a whole response is in, the agent ends its side
    (what it sent past that request stays unfinished), and the gateway, seeing the end, closes too: for a
    connection the gateway would otherwise keep open for a next request."""
    t = tunnel(gw, **tunnel_kw)
    t.sendall(raw)
    out = b""
    if hang_up_after_answer:
        out = read_response(t)
        t.shutdown(socket.SHUT_WR)
    out += read_all(t)
    t.close()
    return out


def status_of(out: bytes) -> int:
    """The status code of a raw HTTP/1 response."""
    assert out.startswith(b"HTTP/1."), out[:200]
    return int(out.split(b" ", 2)[1])


def h2_exchange(gw: Gateway, headers: list[tuple[str, str]], target: str = "allowed.test:443",
                sni: str = "allowed.test", body: bytes | None = None) -> int | None:
    """One HTTP/2 request with exactly these header fields (pseudo-headers included, unvalidated) and `body` in
    one DATA frame if given (no content-length unless the headers say one); its status, or None when the stream
    or the connection was reset instead."""
    t = tunnel(gw, target, sni, alpn=["h2"])
    assert t.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                                               normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=body is None)
    if body is not None:
        conn.send_data(1, body, end_stream=True)
    t.sendall(conn.data_to_send())
    t.settimeout(10)
    status = None
    try:
        while status is None:
            data = t.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return None
            t.sendall(conn.data_to_send())
    except (TimeoutError, OSError):
        pass
    t.close()
    return status


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
                 mitmproxy_args: list[str] | None = None, wrapper: list[str] | None = None, entry: str = "clrk",
                 listen_args: bool = True, db: str | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policies = self.dir / "policies"
        self.policies.mkdir(exist_ok=True)
        self.db = db or self.dir / "data" / "clrk.duckdb"  # or a ClickHouse URL
        self.certs = self.dir / "certs"
        self.port = free_port()
        self.fallback = fallback
        self.mitmproxy_args = list(mitmproxy_args or [])
        self.wrapper = list(wrapper or [])  # a command the gateway runs under (e.g. in its own mount namespace)
        self.entry = entry
        self.listen_args = listen_args  # False: no --listen-host/-p, the gateway listens where its policy says
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
        listen = ["--listen-host", "127.0.0.1", "-p", str(self.port)] if self.listen_args else []
        # a ClickHouse URL goes in the environment, as `clrk run` hands it over (it holds a password)
        db = [] if storeref.is_clickhouse(str(self.db)) else ["--set", f"clrk_db={self.db}"]
        argv = [*command, *listen, "--set", f"clrk_policies={self.policies}", *db, "--set", f"clrk_certs={self.certs}"]
        if self.fallback:
            argv += ["--set", f"clrk_dev_otlp_fallback_endpoint={self.fallback}"]
        argv = self.wrapper + argv + self.mitmproxy_args
        self._log = open(self.log_path, "ab")
        env = {**self.env, "CLRK_DB": str(self.db)} if db == [] else self.env
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
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
        reader = ReadOnly(str(self.db))
        try:
            return reader.read("query", query)
        finally:
            reader.close()

    def wait_record(self, timeout: float = 10.0, **query) -> dict:
        """The newest record matching `query`, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.records(**query)
            if rows:
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"no record matching {query}; gateway log:\n{self.log()[-3000:]}")

    def wait_records(self, n: int, timeout: float = 10.0, **query) -> list[dict]:
        """The records matching `query` (newest first) once there are `n`; fails if there are more, or fewer
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(rows := self.records(**query)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rows) == n, f"{len(rows)} records matching {query}, expected {n}: {rows}"
        return rows

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        """Returns once the gateway's log says `text`: the gateway's own word that something has happened."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc is not None and self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"the gateway exited ({self.proc.returncode}) without logging {text!r}:\n"
                                     f"{self.log()[-3000:]}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"the gateway did not log {text!r} within {timeout:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_client_gone(self, client_port: int, timeout: float = 10.0) -> None:
        """Returns once the gateway has logged the end of the client connection from 127.0.0.1:`client_port`
        (mitmproxy's "client disconnect"): from then on nothing more happens on that connection's behalf."""
        self.wait_log(f"[127.0.0.1:{client_port}] client disconnect", timeout)


def agent_env(gw: Gateway, monkeypatch) -> None:
    """What a user sets for an agent: the proxy with its credentials and the gateway's CA, and no other proxy
    setting of the test process's environment in the way."""
    monkeypatch.setenv("HTTPS_PROXY", gw.proxy_url())
    monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca))
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
