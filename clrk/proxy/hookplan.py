"""mitmproxy's event dispatch, planned once per event and addon chain instead of searched for every event.

For every event of every connection and request (`requestheaders`, `request`, `responseheaders`, `response`,
an `update` after each, and the connection events), mitmproxy's `AddonManager.trigger_event` visits every addon
of the chain — 36 in mitmdump, of which a handful implement any one hook — and for each one enters a
generator-based context manager (`safecall`), creates and awaits an `invoke_addon` coroutine, walks two nested
generators (`_iter_hooks`, `traverse`) and calls `event.args()` (`dataclasses.fields`). Measured with perf at
c = 8 that is over a third of the CPU a bare mitmdump spends per proxied request, almost all of it for addons
that do nothing with the event (docs/PERFORMANCE.md).

`PlannedAddonManager.trigger_event` does the same work from a plan: for each event name, the addons of the
chain that have the hook, with the hook itself, found once. An addon that manages others (one with an
`addons` attribute: mitmproxy's ScriptLoader and its scripts, which a reload replaces) is walked as mitmproxy
walks it, every time. Kept as mitmproxy has it:
- the order (the chain's), sync and async hooks alike, each awaited before the next runs;
- each top-level addon under its own guard: an exception is logged by mitmproxy's own `safecall`, and the
  next addon still runs; `AddonHalt` stops the event, `OptionsError` propagates;
- the plan is remade whenever the chain differs from the one it was made for (`add`, `remove`, `clear`, or
  the chain list edited directly, as `clrk.proxy.master` does to place the gateway).
One difference, by design: a hook method set on an addon already in the chain (not through the chain) is
seen when the chain next changes, not on the next event. No mitmproxy addon does that.

Installed by the gateway's own master (`clrk.proxy.master.GatewayMaster`: `clrk run`, `clrk dev`, the
workers); `mitmdump -s addons/clrk.py` runs mitmproxy's own dispatch.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall

# One entry per top-level addon with something to do: (addon, its hook), or (addon, None) for an addon walked
# as mitmproxy walks it (one whose hook attribute mitmproxy would refuse, or that manages sub-addons and has
# the hook itself), or (addon, CHILDREN) for one that manages sub-addons without having the hook: walked when
# it has any (mitmproxy's ScriptLoader has none unless scripts are loaded).
Plan = tuple[tuple[Any, Any], ...]
CHILDREN = object()


def plan(chain: list[Any], name: str) -> Plan:
    entries: list[tuple[Any, Any]] = []
    for addon in chain:
        try:
            func = getattr(addon, name, None)
            if hasattr(addon, "addons"):
                entries.append((addon, CHILDREN if func is None else None))
                continue
        except Exception:  # a property that raises: walked as mitmproxy walks it, and reported there, every time
            entries.append((addon, None))
            continue
        if not func or isinstance(func, types.ModuleType):
            continue  # mitmproxy skips both (a module of the hook's name is an import, not a hook)
        entries.append((addon, func if callable(func) else None))
    return tuple(entries)


class PlannedAddonManager(AddonManager):
    """mitmproxy's AddonManager whose `trigger_event` dispatches from a plan (see the module's text)."""

    _plans: dict[str, Plan]
    _planned_for: list[Any]

    @classmethod
    def adopt(cls, addons: AddonManager) -> PlannedAddonManager:
        """Turns a master's AddonManager into this class, keeping its chain and lookup."""
        addons.__class__ = cls
        assert isinstance(addons, PlannedAddonManager)
        addons._plans = {}
        addons._planned_for = []
        return addons

    def _plan(self, name: str) -> Plan:
        chain = self.chain
        if chain != self._planned_for:  # identity per element first; addons do not define __eq__
            self._plans = {}
            self._planned_for = list(chain)
        got = self._plans.get(name)
        if got is None:
            got = self._plans[name] = plan(chain, name)
        return got

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """mitmproxy's: the event, then an `update` of its flow — made only when an addon has that hook."""
        args = event_args(event)
        await self._trigger(event, args)
        message = args[0]
        if isinstance(message, flow.Flow) and self._plan("update"):
            await self.trigger_event(hooks.UpdateHook([message]))

    async def trigger_event(self, event: hooks.Hook) -> None:
        await self._trigger(event, event_args(event))

    async def _trigger(self, event: hooks.Hook, args: list[Any]) -> None:
        entries = self._plan(event.name)
        for addon, func in entries:
            try:
                if func is None:
                    await self.invoke_addon(addon, event)
                elif func is CHILDREN:
                    if addon.addons:
                        await self.invoke_addon(addon, event)
                else:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                with safecall():  # mitmproxy's own report of an addon's error (it swallows what is neither above)
                    raise


_FIELDS: dict[type, tuple[str, ...]] = {}


def event_args(event: hooks.Hook) -> list[Any]:
    """`event.args()`: its dataclass fields' values, with the field names looked up once per event class
    (`dataclasses.fields` builds them anew at every call). A class that writes its own `args` is asked."""
    cls = type(event)
    names = _FIELDS.get(cls)
    if names is None:
        if cls.args is not hooks.Hook.args:
            return event.args()
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(event))
    return [getattr(event, n) for n in names]
