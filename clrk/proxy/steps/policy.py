"""Step PolicyLoader: clrk's mitmproxy options, the policy loaded at start and reloaded when its files
change, the listeners it declares (`clrk/proxy/listeners.py`), and the mitmproxy settings clrk relies on
(forced on every configure)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import certifi
from mitmproxy import ctx, exceptions

from clrk import balance, storeref
from clrk.cost import BUNDLED
from clrk.cost import preload as preload_prices
from clrk.escape import printable
from clrk.policy import CompiledPolicy, PolicyError, load_policy
from clrk.policy.loader import policy_files
from clrk.proxy import reuseport
from clrk.proxy.budget_store import RECORDER, SharedLedger
from clrk.proxy.ca import ensure_ca
from clrk.proxy.listeners import Listeners
from clrk.proxy.runtime import Runtime
from clrk.settings import Settings, option_help

log = logging.getLogger("clrk")

RELOAD_POLL_SECONDS = 0.25
MITMPROXY_DEFAULT_CONFDIR = "~/.mitmproxy"
FORCED_OPTIONS = frozenset({"connection_strategy", "flow_detail", "confdir", "rawtcp"})  # see PolicyLoader._configure_mitmproxy


def check_budget_store(url: str) -> None:
    """A shared budget store the gateway can use, or the reason it cannot start (never a silent local ledger:
    replicas would each allow the whole day)."""
    import importlib.util
    import urllib.parse

    if url == RECORDER:  # held by this gateway's recorder: nothing to install
        return
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise exceptions.OptionsError("clrk: clrk_budget_store must be a redis://host:port/db URL (or rediss://, "
                                      f"unix://) or `recorder`, not a {printable(scheme or 'scheme-less')[:20]} one")
    if importlib.util.find_spec("redis") is None:
        raise exceptions.OptionsError("clrk: clrk_budget_store needs the redis client: pip install 'clrk[fleet]'")


def tag_log(worker: int) -> None:
    """The workers of `clrk run --workers N` write to one terminal or file: each of their log lines starts with
    `w<index>` (set once in the templates of mitmproxy's log formatter: nothing more per line), and goes out
    whole, in one write — a block-buffered file or pipe would otherwise mix pieces of lines of several workers."""
    import sys

    from mitmproxy.log import MitmFormatter

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    for handler in logging.getLogger().handlers:
        f = handler.formatter
        if isinstance(f, MitmFormatter):
            if not hasattr(f, "clrk_templates"):
                f.clrk_templates = (f.with_client, f.without_client)  # type: ignore[attr-defined]
            f.with_client, f.without_client = (f"w{worker} {t}" for t in f.clrk_templates)  # type: ignore[attr-defined]


class PolicyLoader:
    """Declares clrk's options, loads the policy, reloads it when its files change."""

    name = "clrk_policy"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._watch: asyncio.Task | None = None
        self._signature: tuple | None = None
        self._loaded_from: str | None = None  # the clrk_policies value in force (file changes: _watch_loop)
        self.listeners = Listeners()

    def load(self, loader) -> None:
        s = Settings()
        for name, f in Settings.model_fields.items():  # clrk_policies, clrk_db, ..., clrk_workers
            loader.add_option(f"clrk_{name}", f.annotation, getattr(s, name), option_help(name))
        # Set by the supervisor of `clrk run --workers N` (clrk/workers.py) on each worker's command line.
        loader.add_option("clrk_worker", int, 0, "clrk: this gateway's worker index under `clrk run --workers`.")
        loader.add_option("clrk_worker_restarts", int, 0, "clrk: how often the supervisor restarted this worker.")

    def configure(self, updated: set[str]) -> None:
        if FORCED_OPTIONS & updated:
            # Every time, not once: a `-v`, `--flow-detail`, the confdir's config.yaml or a later `set` must
            # not undo what clrk's security relies on.
            self._configure_mitmproxy()
        if "clrk_workers" in updated or "clrk_worker" in updated:
            reuseport.enabled = ctx.options.clrk_workers > 1  # before mitmproxy opens a listener: all are shared
            if reuseport.enabled:
                tag_log(ctx.options.clrk_worker)
                balance.start(ctx.options.clrk_worker)  # connections kept even across workers (clrk/balance.py)
        if "clrk_budget_store" in updated:
            self._budget_store(ctx.options.clrk_budget_store)
        if "clrk_policies" in updated and (self.rt.policy is None or ctx.options.clrk_policies != self._loaded_from):
            try:
                policy = load_policy(ctx.options.clrk_policies)
                self._apply(policy)
            except PolicyError as e:
                raise exceptions.OptionsError(f"clrk: the policy in {ctx.options.clrk_policies} is invalid:\n{e}") from None
            except OSError as e:
                raise exceptions.OptionsError(f"clrk: the policy in {ctx.options.clrk_policies} cannot be used: {e}") from None
            self._signature = self._current_signature()
            self._loaded_from = ctx.options.clrk_policies
        if "clrk_dev_otlp_fallback_endpoint" in updated and self.rt.sink is not None:
            self.rt.sink.send_config(export_config(self.rt.policy))

    def _budget_store(self, url: str) -> None:
        """The ledger budgets use, set before the first request can arrive: the shared one on Redis, or held by
        the recorder, when a store is named (clrk.proxy.budget_store). Named at start only: a change later
        needs a restart."""
        current = self.rt.ledger
        if url == (current.url if isinstance(current, SharedLedger) else ""):
            return
        if self.rt.policy is not None:  # already running
            raise exceptions.OptionsError("clrk: clrk_budget_store is set at start; restart the gateway to change it")
        if url:
            check_budget_store(url)
            self.rt.ledger = SharedLedger(url)

    def _configure_mitmproxy(self) -> None:
        changes: dict = {}
        # Never touch an upstream before the decision: the default "eager" dials on CONNECT.
        if ctx.options.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"
        # mitmproxy's own flow log prints URLs with their query secrets; clrk logs redacted lines instead.
        if ctx.options.flow_detail != 0:
            changes["flow_detail"] = 0
        # No opaque relays on a terminating listener: bytes that are not HTTP, and a 101 that is not a
        # WebSocket, end the connection instead of becoming a raw TCP pipe (Passthrough has its own relay).
        if ctx.options.rawtcp:
            changes["rawtcp"] = False
        if ctx.options.confdir == MITMPROXY_DEFAULT_CONFDIR:
            ensure_ca(ctx.options.clrk_certs)
            changes["confdir"] = str(Path(ctx.options.clrk_certs).resolve())
        if changes:
            ctx.options.update(**changes)

    def _apply(self, policy: CompiledPolicy) -> None:
        """Puts a policy in force. Everything that can fail happens before the swap; the recorder learns the
        names to redact before the first record made under the new policy reaches it (same socket, in order)."""
        self._apply_upstream_trust(policy)
        self.listeners.apply(policy)
        idle = [g.idle_timeout for g in policy.gateways if g.idle_timeout is not None]
        if idle and ctx.options.tcp_timeout != min(idle):
            ctx.options.update(tcp_timeout=min(idle))
        if self.rt.sink is not None:
            self.rt.sink.send_config(export_config(policy))
        if _may_price(policy):
            preload_prices()  # off the event loop, once: the first model call's price lookup finds it loaded
        self.rt.policy = policy
        for w in policy.warnings:  # in force all the same: they make no rule wider (clrk.policy.check)
            log.warning("clrk: policy warning: %s", w)

    def _apply_upstream_trust(self, policy: CompiledPolicy) -> None:
        """caBundle adds to the default trust store: mitmproxy takes one file, so write the union."""
        bundles = sorted({g.ca_bundle for g in policy.gateways if g.ca_bundle})
        if not bundles:
            if ctx.options.ssl_verify_upstream_trusted_ca and "clrk-upstream-trust" in ctx.options.ssl_verify_upstream_trusted_ca:
                ctx.options.update(ssl_verify_upstream_trusted_ca=None)
            return
        pem = Path(certifi.where()).read_bytes()
        for b in bundles:
            pem += b"\n" + Path(b).read_bytes()
        digest = hashlib.sha256(pem).hexdigest()[:16]
        out = storeref.local_dir(ctx.options.clrk_db) / f"clrk-upstream-trust-{digest}.pem"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(pem)
            os.replace(tmp, out)
        if ctx.options.ssl_verify_upstream_trusted_ca != str(out):
            ctx.options.update(ssl_verify_upstream_trusted_ca=str(out))

    async def running(self) -> None:
        self._watch = asyncio.create_task(self._watch_loop())
        await self.listeners.running()

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def _current_signature(self) -> tuple:
        files = [str(p) for p in policy_files(ctx.options.clrk_policies)]
        # Secret files and CA bundles count too: rotating a token file must take effect like a policy edit.
        extra = list(self.rt.policy.referenced_files) if self.rt.policy is not None else []
        sig = []
        for f in files + extra:
            try:
                st = os.stat(f)
                sig.append((f, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((f, None, None))
        return tuple(sig)

    async def _watch_loop(self) -> None:
        """Polls the policy files; a change is loaded off the event loop and swapped in whole. Nothing that
        goes wrong in one round stops the next."""
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            try:
                await self._reload_if_changed()
            except Exception as e:
                log.error("clrk: policy reload failed (%s); the last good policy stays in force", e)

    async def _reload_if_changed(self) -> None:
        try:
            sig = await asyncio.to_thread(self._current_signature)
        except PolicyError as e:
            sig = (str(e),)
        if sig == self._signature:
            return
        self._signature = sig
        try:
            policy = await asyncio.to_thread(load_policy, ctx.options.clrk_policies)
        except PolicyError as e:
            log.error("clrk: policy reload failed; the last good policy stays in force:\n%s", e)
            return
        self._apply(policy)
        log.info("clrk: policy reloaded from %s (%d documents)", ctx.options.clrk_policies, len(policy.documents))


def export_config(policy: CompiledPolicy | None) -> dict:
    gateways = {}
    if policy is not None:
        for g in policy.gateways:
            gateways[g.name] = {"endpoint": g.otlp_endpoint, "headers": dict(g.otlp_headers), **g.telemetry}
    return {
        "gateways": gateways,
        "fallback": ctx.options.clrk_dev_otlp_fallback_endpoint or "",
        # What the recorder redacts when it builds records (it only ever adds to these).
        "redact_headers": sorted(policy.redact_headers) if policy is not None else [],
        "redact_query": sorted(policy.redact_query) if policy is not None else [],
    }


def _may_price(policy: CompiledPolicy) -> bool:
    """Whether model calls may be allowed (and so priced): an AIProviderRoute, ModelPricing, a default of
    allow-all, or an EgressRoute to a provider's host. Otherwise the prices are read on the first priced call."""
    if policy.provider_rules or policy.pricing is not BUNDLED or any(g.default_allow for g in policy.gateways):
        return True
    return any(r.matches_host(host) for r in policy.routes for host in policy.provider_hosts)
