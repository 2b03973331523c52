"""The listeners an EgressGateway declares, opened by the gateway itself: `mitmdump -s addons/clrk.py` and
`clrk run` listen where the policy says, and a policy edit opens or closes ports on reload.

mitmproxy listens where its `mode` option says and can change it at run time (its proxyserver addon starts
and stops servers to match). clrk sets `mode` to one `regular@<address>:<port>` per declared listener
(Terminate and Passthrough alike: the Passthrough step tells them apart by port). Who decides:

- The policy says where: each listener binds its own `address` (default 127.0.0.1) and port. No command-line
  flag widens a declared listener; binding wider is the policy's `address: 0.0.0.0`.
- `mode` is clrk's while it is mitmproxy's default (`regular`) or what clrk set last. A `--mode` naming
  anything else (`clrk run --port`) is the operator's explicit choice: clrk then opens nothing itself and
  says so once.
- `--listen-host` and `-p` (mitmproxy's `listen_host`, `listen_port`) are for what the policy does not
  say: a policy without listeners listens on `listen_port` (8080 by default) at `listen_host`, and there on
  127.0.0.1 unless `--listen-host` says otherwise.
- `mitmdump -s addons/clrk.py`: mitmproxy starts its own default listener before it loads any script (on
  `--listen-host`, all interfaces if unset, and `-p`); clrk replaces it with the declared listeners as soon
  as it runs. `clrk run` (and `--listen-host 127.0.0.1` by hand) avoid that moment.

A listener whose address cannot be bound is logged with its name, address and reason; after a reload the
others stay open, at start the gateway stops (mitmproxy's start-up check): a gateway that cannot listen where
it was told does not half-start.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx
from mitmproxy.proxy.mode_specs import ProxyMode

from clrk.policy import CompiledPolicy

log = logging.getLogger("clrk")

MITMPROXY_DEFAULT_MODE = ["regular"]
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8080


def wanted_modes(policy: CompiledPolicy, listen_host: str, listen_port: int | None) -> list[str]:
    """The mitmproxy modes that open `policy`'s listeners (see the module docstring for the rules)."""
    if policy.listeners:
        return [li.mode for li in policy.listeners]
    return [f"regular@{listen_host or DEFAULT_ADDRESS}:{listen_port or DEFAULT_PORT}"]


class Listeners:
    """Keeps mitmproxy's `mode` equal to the policy's listeners, unless the operator chose `--mode`."""

    def __init__(self) -> None:
        self._set: list[str] | None = None  # the modes clrk set last
        self._names: dict[str, str] = {}  # mode spec -> "listener <name> of EgressGateway <gateway>"
        self._told_operator = False
        self._reported: set[tuple[str, str]] = set()
        self._watching = None  # mitmproxy's proxyserver addon, once its server changes are followed
        self._started = False  # past start-up: a listener that fails no longer stops the gateway

    def apply(self, policy: CompiledPolicy) -> None:
        self._watch_servers()
        current = list(ctx.options.mode)
        if current != MITMPROXY_DEFAULT_MODE and current != self._set:
            if policy.listeners and not self._told_operator:
                self._told_operator = True
                log.warning("clrk: --mode %s was given, so the policy's listeners (%s) are not opened by clrk",
                            " ".join(current), ", ".join(f"{li.name} {li.address}:{li.port}" for li in policy.listeners))
            return
        wanted = wanted_modes(policy, ctx.options.listen_host, ctx.options.listen_port)
        self._names = {li.mode: f"listener {li.name} of EgressGateway {li.gateway}" for li in policy.listeners}
        self._set = wanted
        if wanted != current:
            ctx.options.update(mode=wanted)  # mitmproxy opens what is new and closes what is gone

    async def running(self) -> None:
        """`mitmdump -s`: mitmproxy opened its servers before it loaded clrk, and updates them on a change of
        `mode` only once it runs. Open the declared listeners now, awaited, so that one that cannot be bound
        stops the start-up as it does under `clrk run`."""
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is not None and self._set is not None and \
                {s.mode.full_spec for s in proxyserver.servers} != set(self._set):
            await proxyserver.servers.update([ProxyMode.parse(m) for m in self._set])
        self._started = True

    def _watch_servers(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver") if self._watching is None else None
        if proxyserver is not None:
            self._watching = proxyserver
            proxyserver.servers.changed.connect(self._servers_changed)

    def _servers_changed(self) -> None:
        """After mitmproxy (re)started its servers: a listener it could not open is named, with why."""
        proxyserver = ctx.master.addons.get("proxyserver")
        for server in proxyserver.servers:
            e = server.last_exception
            spec = server.mode.full_spec
            if e is None or server.is_running or (spec, str(e)) in self._reported:
                continue
            self._reported.add((spec, str(e)))
            what = self._names.get(spec, f"mode {spec}")
            log.error("clrk: %s cannot listen on %s:%s: %s; %s", what,
                      server.mode.listen_host(ctx.options.listen_host) or "0.0.0.0",
                      server.mode.listen_port(ctx.options.listen_port), e,
                      "the other listeners stay open" if self._started else "the gateway does not start")
