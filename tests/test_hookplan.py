"""clrk.proxy.hookplan: mitmproxy's event dispatch from a plan, held to mitmproxy's own AddonManager.

The differential test runs the same addons, events and chain edits through both managers and requires the same
calls in the same order, the same errors logged and the same exceptions raised; the named tests pin down the
cases one by one (mitmproxy's own tests of trigger_event among them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from clrk.proxy.hookplan import PlannedAddonManager
from clrk.proxy.master import GatewayMaster

HOOKS = ("requestheaders", "request", "response", "update", "running")


@dataclass(frozen=True)
class Spec:
    """One addon: what each of its hooks does (missing: no such hook)."""
    name: str
    hooks: tuple[tuple[str, str], ...]  # (hook, behaviour)
    children: tuple[Spec, ...] = ()


BEHAVIOURS = ("sync", "async", "raise", "halt", "async_halt", "options_error", "not_callable", "module")


class Addon:
    def __init__(self, spec: Spec, calls: list[str]):
        self.name = spec.name
        if spec.children:
            self.addons = [Addon(c, calls) for c in spec.children]
        for hook, behaviour in spec.hooks:
            setattr(self, hook, _hook(spec.name, hook, behaviour, calls))

    def __repr__(self) -> str:  # errors name it; the same on both sides
        return f"Addon({self.name})"


def _hook(name: str, hook: str, behaviour: str, calls: list[str]):
    if behaviour == "not_callable":
        return True
    if behaviour == "module":
        return types  # an import of the hook's name: mitmproxy skips it
    if behaviour.startswith("async"):
        async def run_async(*args):
            await asyncio.sleep(0)
            calls.append(f"{name}.{hook}")
            if behaviour == "async_halt":
                raise exceptions.AddonHalt
        return run_async

    def run(*args):
        calls.append(f"{name}.{hook}")
        if behaviour == "raise":
            raise ValueError(f"{name} fails")
        if behaviour == "halt":
            raise exceptions.AddonHalt
        if behaviour == "options_error":
            raise exceptions.OptionsError(f"{name} refuses")
    return run


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Run:
    manager: addonmanager.AddonManager
    calls: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)


def _events(flow):
    return {"requestheaders": HttpRequestHeadersHook(flow), "request": HttpRequestHook(flow),
            "response": HttpResponseHook(flow), "running": hooks.RunningHook()}


@contextlib.contextmanager
def fresh_master(planned: bool = True):
    """A mitmproxy Master (in a running event loop) whose AddonManager is planned or mitmproxy's own; its log
    handler goes with it."""
    m = master.Master(options.Options())
    if planned:
        PlannedAddonManager.adopt(m.addons)
    try:
        yield m
    finally:
        m._legacy_log_events.uninstall()


async def _replay(planned: bool, chain: list[Spec], steps: list[tuple]) -> tuple[list[str], list[str], list[str]]:
    with fresh_master(planned) as m:
        return await _replay_on(m.addons, chain, steps)


async def _replay_on(mgr: addonmanager.AddonManager, chain: list[Spec], steps: list[tuple]) -> tuple[list[str], list[str], list[str]]:
    calls: list[str] = []
    outcomes: list[str] = []
    for s in chain:
        mgr.add(Addon(s, calls))
    flow = tflow.tflow(resp=True)
    errors = Errors()
    logger = logging.getLogger("mitmproxy.addonmanager")
    logger.addHandler(errors)
    try:
        for step in steps:
            kind = step[0]
            if kind == "event":
                try:
                    await mgr.handle_lifecycle(_events(flow)[step[1]]) if step[1] != "running" else await mgr.trigger_event(
                        hooks.RunningHook())
                    outcomes.append("ok")
                except exceptions.OptionsError as e:
                    outcomes.append(f"OptionsError {e}")
            elif kind == "add":
                try:
                    mgr.add(Addon(step[1], calls))
                except exceptions.AddonManagerError:
                    outcomes.append("duplicate")
            elif kind == "insert" and mgr.chain:  # the chain list edited directly, as clrk's master places the gateway
                try:
                    mgr.chain.insert(step[2] % len(mgr.chain), mgr.register(Addon(step[1], calls)))
                except exceptions.AddonManagerError:
                    outcomes.append("duplicate")
            elif kind == "remove" and mgr.chain:
                try:
                    mgr.remove(mgr.chain[step[1] % len(mgr.chain)])
                except exceptions.AddonManagerError:  # a child added behind the manager's back is unknown to it
                    outcomes.append("unknown")
            elif kind == "child" and mgr.chain:  # a managing addon's children change (a script reloaded, say)
                parent = mgr.chain[step[1] % len(mgr.chain)]
                if hasattr(parent, "addons"):
                    parent.addons.append(Addon(step[2], calls))
    finally:
        logger.removeHandler(errors)
    return calls, outcomes, errors.messages


names = st.sampled_from("abcdefghij")
hook_set = st.lists(st.tuples(st.sampled_from(HOOKS), st.sampled_from(BEHAVIOURS)), max_size=3, unique_by=lambda t: t[0])
leaf = st.builds(Spec, names, hook_set.map(tuple))
specs = st.recursive(leaf, lambda inner: st.builds(Spec, names, hook_set.map(tuple), st.lists(inner, max_size=2).map(tuple)),
                     max_leaves=4)
steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.sampled_from(("requestheaders", "request", "response", "running"))),
    st.tuples(st.just("add"), specs),
    st.tuples(st.just("insert"), specs, st.integers(0, 9)),
    st.tuples(st.just("remove"), st.integers(0, 9)),
    st.tuples(st.just("child"), st.integers(0, 9), leaf),
), max_size=14)


def _unique(chain: list[Spec]) -> list[Spec]:
    """Specs whose addon names (their children's included) do not collide: mitmproxy refuses duplicates."""
    seen: set[str] = set()
    out = []
    for s in chain:
        ns = _names(s)
        if len(ns) == len(set(ns)) and not seen & set(ns):
            seen |= set(ns)
            out.append(s)
    return out


def _names(s: Spec) -> list[str]:
    return [s.name, *(n for c in s.children for n in _names(c))]


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=6), steps)
def test_the_plan_calls_what_mitmproxy_calls_in_its_order(chain, script):
    chain = _unique(chain)
    expected = asyncio.run(_replay(False, chain, script))
    got = asyncio.run(_replay(True, chain, script))
    assert got == expected


def test_the_differential_test_sees_a_dispatch_that_skips_the_chain_order(monkeypatch):
    """The oracle comparison can fail: a plan that ran async hooks last would be caught."""
    chain = [Spec("a", (("request", "async"),)), Spec("b", (("request", "sync"),))]
    script = [("event", "request")]
    expected = asyncio.run(_replay(False, chain, script))

    def reversed_plan(chain_, name):
        return tuple(reversed(original(chain_, name)))

    from clrk.proxy import hookplan
    original = hookplan.plan
    monkeypatch.setattr(hookplan, "plan", reversed_plan)
    assert asyncio.run(_replay(True, chain, script)) != expected


def test_an_addon_that_raises_is_logged_and_the_next_still_runs():
    chain = [Spec("a", (("request", "raise"),)), Spec("b", (("request", "sync"),))]
    calls, outcomes, errors = asyncio.run(_replay(True, chain, [("event", "request")]))
    assert calls == ["a.request", "b.request"] and outcomes == ["ok"]
    assert errors == ["Addon error: a fails"]


def test_addon_halt_stops_the_event_and_options_error_propagates():
    chain = [Spec("a", (("request", "async_halt"), ("response", "options_error"))), Spec("b", (("request", "sync"), ("response", "sync")))]
    calls, outcomes, _ = asyncio.run(_replay(True, chain, [("event", "request"), ("event", "response")]))
    assert calls == ["a.request", "a.response"]
    assert outcomes == ["ok", "OptionsError a refuses"]


def test_a_change_of_the_chain_is_seen_at_the_next_event():
    chain = [Spec("a", (("request", "sync"),))]
    script = [("event", "request"), ("add", Spec("b", (("request", "sync"),))), ("event", "request"),
              ("insert", Spec("c", (("request", "sync"),)), 0), ("event", "request"), ("remove", 1), ("event", "request")]
    calls, _, _ = asyncio.run(_replay(True, chain, script))
    assert calls == ["a.request", "a.request", "b.request", "c.request", "a.request", "b.request", "c.request", "b.request"]


def test_a_managing_addon_is_walked_at_every_event():
    """ScriptLoader's scripts change without the chain changing (a reload): their hooks are found every time."""
    chain = [Spec("loader", (), (Spec("s1", (("request", "sync"),)),))]
    calls, _, _ = asyncio.run(_replay(True, chain, [("event", "request"), ("child", 0, Spec("s2", (("request", "async"),))),
                                                    ("event", "request")]))
    assert calls == ["s1.request", "s1.request", "s2.request"]


class Broken:
    """An addon whose hook lookup itself raises once it is registered (mitmproxy's registration reads every
    attribute): mitmproxy reports it at every event and goes on."""
    name = "broken"
    armed = False

    @property
    def request(self):
        if self.armed:
            raise RuntimeError("no hook today")
        return None


def test_an_addon_whose_hook_lookup_raises_is_reported_each_time_as_mitmproxy_does():
    async def run(planned: bool) -> tuple[list[str], list[str]]:
        with fresh_master(planned) as m:
            calls: list[str] = []
            broken = Broken()
            m.addons.add(broken)
            broken.armed = True
            m.addons.add(Addon(Spec("after", (("request", "sync"),)), calls))
            errors = Errors()
            logging.getLogger("mitmproxy.addonmanager").addHandler(errors)
            try:
                for _ in range(2):
                    await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
            finally:
                logging.getLogger("mitmproxy.addonmanager").removeHandler(errors)
            return calls, errors.messages
    got, expected = asyncio.run(run(True)), asyncio.run(run(False))
    assert got == expected == (["after.request", "after.request"], ["Addon error: no hook today"] * 2)


# mitmproxy's own tests of the asynchronous dispatch (test/mitmproxy/test_addonmanager.py), on the planned manager.

class TAddon:
    def __init__(self, name):
        self.name = name
        self.running_called = False

    def running(self):
        self.running_called = True


class AsyncTAddon(TAddon):
    async def running(self):
        self.running_called = True


class AsyncTHalt:
    async def running(self):
        raise exceptions.AddonHalt


def test_mitmproxys_async_halt():
    async def run():
        with fresh_master() as m:
            a = m.addons
            halt, end = AsyncTHalt(), AsyncTAddon("end")
            a.add(halt)
            a.add(end)
            await a.trigger_event(hooks.RunningHook())
            assert not end.running_called
            a.remove(halt)
            await a.trigger_event(hooks.RunningHook())
            assert end.running_called
    asyncio.run(run())


def test_mitmproxys_mixed_async_sync():
    async def run():
        with fresh_master() as m:
            a = m.addons
            a1, a2 = TAddon("sync"), AsyncTAddon("async")
            a.add(a1)
            a.add(a2)
            await a.trigger_event(hooks.RunningHook())
            assert a1.running_called and a2.running_called
            await a.handle_lifecycle(HttpRequestHook(tflow.tflow()))
    asyncio.run(run())


def test_the_gateway_master_dispatches_from_a_plan_with_clrk_before_the_scripts():
    async def run():
        m = GatewayMaster(options.Options(), with_termlog=False)
        assert isinstance(m.addons, PlannedAddonManager)
        try:
            gateway = m.add_gateway()
        finally:
            m._legacy_log_events.uninstall()
        entries = m.addons._plan("request")
        owners = [a for a, _ in entries]
        assert gateway in owners and m.addons.get("scriptloader") in owners
        assert owners.index(gateway) == owners.index(m.addons.get("scriptloader")) - 1
        # mitmdump's addons without a request hook are not visited for it
        assert m.addons.get("dumper") not in owners and len(owners) < len(m.addons.chain) / 2
    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


@dataclass
class CustomArgs(hooks.Hook):
    flow: object

    def args(self):
        return ["rewritten"]


def test_event_args_are_mitmproxys_and_a_hook_with_its_own_args_is_asked():
    from clrk.proxy.hookplan import event_args

    f = tflow.tflow()
    for event in (HttpRequestHook(f), HttpResponseHook(f), hooks.RunningHook(), hooks.UpdateHook([f]), CustomArgs(f)):
        for _ in range(2):  # the second time from the remembered field names
            assert event_args(event) == event.args()
    assert event_args(CustomArgs(f)) == ["rewritten"]
