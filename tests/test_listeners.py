"""Listeners come from the policy: a real `mitmdump -s addons/clrk.py` started with no `--mode`, `-p` or
`--listen-host` opens every listener its EgressGateway declares (address and port, Terminate and
Passthrough), binds 127.0.0.1 unless a listener's `address` says otherwise, opens and closes ports when a
policy edit adds or removes listeners, and names a listener whose address cannot be bound while keeping the
others. The rules for `--listen-host`, `--port` and `--mode` are checked in process."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest
import yaml

from clrk.launch import gateway_argv
from clrk.policy import PolicyError, load_policy
from clrk.proxy.listeners import wanted_modes
from tests.harness.gateway import Gateway, agent_docs, free_port, gateway_doc, route
from tests.harness.util import compile_policy, new_invocation


def listening(port: int) -> set[str]:
    """The local IPv4 addresses a socket of this machine listens on at `port` (from /proc/net/tcp)."""
    out = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                out.add(socket.inet_ntoa(bytes.fromhex(ip)[::-1]))
    return out


def listener(name: str, port: int, mode: str = "Terminate", address: str | None = None) -> dict:
    return {"name": name, "port": port, "protocol": "TLS", "tls": {"mode": mode}, **({"address": address} if address is not None else {})}


def policy(pki, upstream, listeners: list[dict]) -> list[dict]:
    g = gateway_doc(aliases={"allowed.test": upstream.address}, ca_bundle=str(pki[0]))
    g["spec"]["listeners"] = listeners
    return [g, *agent_docs(), route("r", ["allowed.test"])]


def through(gw: Gateway, host: str, port: int, verify: ssl.SSLContext) -> httpx.Response:
    inv = new_invocation()
    proxy = gw.proxy_url().replace(f"127.0.0.1:{gw.port}", f"{host}:{port}")
    with httpx.Client(proxy=proxy, verify=verify, trust_env=False, timeout=15) as c:
        return c.get("https://allowed.test/json/x", headers={"clrk-invocation-id": inv})


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_mitmdump_opens_the_policys_listeners_and_follows_policy_edits(tmp_path, pki, upstream):
    """mitmproxy opens its own default listener before it loads any script: given `--listen-host 127.0.0.1`
    and a free `-p` here (this machine is shared; 8080 may be taken), and replaced by the declared listeners,
    which `--listen-host` does not move."""
    term, passthrough, added, unbindable, default = free_port(), free_port(), free_port(), free_port(), free_port()
    gw = Gateway(tmp_path, policy(pki, upstream, [listener("tls-out", term), listener("pass", passthrough, "Passthrough")]),
                 entry="mitmdump", listen_args=False, mitmproxy_args=["--listen-host", "127.0.0.1", "-p", str(default)])
    gw.port = term
    gw.start()
    try:
        upstream_ca = ssl.create_default_context(cafile=str(pki[0]))
        gw.wait_log(f"listening at 127.0.0.1:{term}")
        gw.wait_log(f"listening at 127.0.0.1:{passthrough}")
        gw.wait_log(f"at 127.0.0.1:{default} stopped")  # mitmproxy's own is replaced
        # Both declared listeners answer, on 127.0.0.1 only.
        assert listening(term) == {"127.0.0.1"} and listening(passthrough) == {"127.0.0.1"} and not listening(default)
        assert through(gw, "127.0.0.1", term, gw.ssl_context()).status_code == 200  # terminated: the gateway's CA
        assert through(gw, "127.0.0.1", passthrough, upstream_ca).status_code == 200  # end to end: the upstream's CA

        # An edit: the terminating listener goes, one on another loopback address comes, one cannot be bound.
        gw.write_policy(policy(pki, upstream, [listener("pass", passthrough, "Passthrough"),
                                               listener("second", added, address="127.0.0.2"),
                                               listener("elsewhere", unbindable, address="192.0.2.1")]))
        gw.wait_log(f"listening at 127.0.0.2:{added}")
        gw.wait_log(f"at 127.0.0.1:{term} stopped")
        gw.wait_log(f"clrk: listener elsewhere of EgressGateway test-gw cannot listen on 192.0.2.1:{unbindable}")
        assert listening(added) == {"127.0.0.2"} and not listening(term) and refused("127.0.0.1", term)
        assert through(gw, "127.0.0.2", added, gw.ssl_context()).status_code == 200
        assert through(gw, "127.0.0.1", passthrough, upstream_ca).status_code == 200  # untouched by the edit
        assert "the other listeners stay open" in gw.log()
    finally:
        gw.stop()


def test_an_explicit_mode_is_left_alone_and_said(tmp_path, pki, upstream):
    """`--mode` given by the operator: clrk opens nothing itself and says which listeners it did not open."""
    declared, chosen = free_port(), free_port()
    gw = Gateway(tmp_path, policy(pki, upstream, [listener("tls-out", declared)]), entry="mitmdump", listen_args=False,
                 mitmproxy_args=["--mode", f"regular@127.0.0.1:{chosen}"])
    gw.port = chosen
    gw.start()
    try:
        assert through(gw, "127.0.0.1", chosen, gw.ssl_context()).status_code == 200
        assert not listening(declared)
        assert f"the policy's listeners (tls-out 127.0.0.1:{declared}) are not opened by clrk" in gw.log()
    finally:
        gw.stop()


@pytest.mark.parametrize("entry", ["clrk", "mitmdump"])
def test_a_listener_that_cannot_be_bound_at_start_stops_the_gateway_saying_which(tmp_path, pki, upstream, entry):
    """At start a gateway that cannot listen where its policy says does not half-start, whichever way it runs."""
    ok, bad = free_port(), free_port()
    extra = ["--listen-host", "127.0.0.1", "-p", str(free_port())] if entry == "mitmdump" else []
    gw = Gateway(tmp_path, policy(pki, upstream, [listener("ok", ok), listener("elsewhere", bad, address="192.0.2.1")]),
                 entry=entry, listen_args=False, mitmproxy_args=extra)
    try:
        gw.start()  # may see mitmdump's own start-up listener before the declared ones fail
    except RuntimeError:
        pass
    assert gw.proc.wait(30) == 1
    gw._log.close()
    assert (f"clrk: listener elsewhere of EgressGateway test-gw cannot listen on 192.0.2.1:{bad}" in gw.log()
            and "the gateway does not start" in gw.log())


# ------------------------------------------------------------------------------------------- in process


def compiled(*listeners: dict):
    g = {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressGateway", "metadata": {"name": "g"},
         "spec": {"listeners": list(listeners)}}
    return compile_policy(g)


def test_a_listener_binds_loopback_unless_its_address_says_otherwise():
    p = compiled(listener("a", 8080), listener("b", 8443, "Passthrough", address="0.0.0.0"), listener("c", 9000, address="::"))
    assert wanted_modes(p, "", None) == ["regular@127.0.0.1:8080", "regular@0.0.0.0:8443", "regular@:::9000"]
    # The policy says where: --listen-host and -p never move (or widen) a declared listener.
    assert wanted_modes(p, "10.1.2.3", 7777) == wanted_modes(p, "", None)
    # No listeners: mitmproxy's port, on loopback unless --listen-host says otherwise.
    assert wanted_modes(compiled(), "", None) == ["regular@127.0.0.1:8080"]
    assert wanted_modes(compiled(), "", 9999) == ["regular@127.0.0.1:9999"]
    assert wanted_modes(compiled(), "0.0.0.0", None) == ["regular@0.0.0.0:8080"]


@pytest.mark.parametrize("address", ["localhost", "127.1", "0:0::0", "300.1.1.1", ""])
def test_a_listener_address_is_an_ip_address_in_its_usual_spelling(tmp_path, address):
    g = {"apiVersion": "clrk.apoxy.dev/v1alpha1", "kind": "EgressGateway", "metadata": {"name": "g"},
         "spec": {"listeners": [listener("a", 8080, address=address)]}}
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(g))
    with pytest.raises(PolicyError) as e:
        load_policy(str(tmp_path))
    assert "spec.listeners[0].address" in str(e.value) and "0.0.0.0 (every IPv4 interface)" in str(e.value)


def test_clrk_run_passes_no_mode_unless_told():
    argv = gateway_argv("policies", "data/x.duckdb", "certs", [], "", "", [])
    assert "--mode" not in argv and "--listen-host" not in argv
    argv = gateway_argv("policies", "data/x.duckdb", "certs", [9000], "", "", [])
    assert argv[argv.index("--mode") + 1] == "regular@127.0.0.1:9000" and "--listen-host" not in argv
    argv = gateway_argv("policies", "data/x.duckdb", "certs", [], "0.0.0.0", "", [])
    assert "--mode" not in argv and argv[argv.index("--listen-host") + 1] == "0.0.0.0"


def test_the_gateway_clrk_run_starts_opens_only_the_declared_listeners(tmp_path, pki, upstream):
    """`clrk run` passes no --mode: its gateway process sets the declared listeners before mitmproxy opens any."""
    port = free_port()
    gw = Gateway(tmp_path, policy(pki, upstream, [listener("tls-out", port)]), listen_args=False)
    gw.port = port
    gw.start()
    try:
        assert through(gw, "127.0.0.1", port, gw.ssl_context()).status_code == 200
        opened = [line for line in gw.log().splitlines() if "proxy listening at" in line]
        assert len(opened) == 1 and f"listening at 127.0.0.1:{port}" in opened[0], opened
    finally:
        gw.stop()
