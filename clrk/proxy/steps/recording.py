"""Step Recording: one record per transaction, handed to the recorder process; the connection to it, the
budget ledger's load, and the graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from mitmproxy import ctx, http

from clrk.proxy.budget import day_start, utc_day
from clrk.proxy.budget_store import SharedLedger
from clrk.proxy.dispatch import failed
from clrk.proxy.runtime import Runtime
from clrk.proxy.sink import RecordSink
from clrk.proxy.steps.policy import export_config
from clrk.proxy.transaction import METADATA_KEY, Transaction

log = logging.getLogger("clrk")

DRAIN_SECONDS = 30


class Recording:
    """Ends each transaction with a record; owns the connection to the recorder process and the stop: on
    SIGTERM/SIGINT no new connection is accepted, transactions in flight finish, every record is flushed."""

    name = "clrk_recording"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the proxy's, once running: records made after answers

    async def running(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # mitmproxy stops at once on SIGTERM/SIGINT; a gateway first lets what is in flight finish.
        loop.add_signal_handler(signal.SIGTERM, self._graceful_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._graceful_stop, "SIGINT")
        o = ctx.options
        sink = RecordSink(o.clrk_db, (o.clrk_worker, o.clrk_worker_restarts) if o.clrk_workers > 1 else None)
        self.rt.sink = sink
        if isinstance(self.rt.ledger, SharedLedger):
            self.rt.ledger.attach(sink)  # before the first connection: its hello carries the ledger's
        sink.send_config(export_config(self.rt.policy))
        for rec in self.rt.unsent:
            sink.submit(rec)
        self.rt.unsent.clear()
        try:
            await sink.start()
        except Exception as e:  # keeps trying in the background; records wait (bounded) meanwhile
            log.error("clrk: the recorder is not available yet: %s", e)
            sink.reconnect_soon()
        if isinstance(self.rt.ledger, SharedLedger):
            self._share_budgets(sink, self.rt.ledger)
        self._budgets_task = asyncio.create_task(self._load_budgets(sink))

    def _share_budgets(self, sink: RecordSink, ledger: SharedLedger) -> None:
        """Budgets are on the shared store (clrk.proxy.budget_store, set up by PolicyLoader): its state is
        reported to the recorder (for `clrk status`) when it changes, looked at once a second."""
        log.info("clrk: budgets are shared on %s", ledger.display)

        def state() -> dict:
            policy = self.rt.policy
            return ledger.state({g.name: g.budget_fail_open for g in policy.gateways} if policy is not None else {})

        last: dict = {}

        def report() -> None:
            nonlocal last
            now = state()
            if now != last:
                sink.send_budget_store(now)
                last = now

        async def keep_reporting() -> None:
            while True:
                await asyncio.sleep(1.0)
                report()

        ledger.on_change = report
        report()
        self._report_task = asyncio.create_task(keep_reporting())

    def _graceful_stop(self, signame: str) -> None:
        if self._stopping:
            log.info("clrk: %s again: stopping now", signame)
            ctx.master.shutdown()
            return
        self._stopping = True
        log.info("clrk: %s: accepting no new connections; letting %d transaction(s) in flight finish (up to %ds; "
                 "signal again to stop at once)", signame, self.rt.in_flight, DRAIN_SECONDS)
        ctx.options.update(server=False)
        self._drain_task = asyncio.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.rt.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.rt.in_flight > 0:
            log.warning("clrk: %d transaction(s) still in flight after %ds; stopping anyway", self.rt.in_flight, DRAIN_SECONDS)
        ctx.master.shutdown()

    async def _load_budgets(self, sink: RecordSink) -> None:
        """Today's usage per budget pool, from the store: budgets survive a restart. Retried until it works;
        until then budgeted routes answer 503 (they cannot know what is left)."""
        delay, warned = 0.2, False
        while not self.rt.ledger.loaded:
            day = utc_day(time.time())
            try:
                reply = await sink.request({"t": "budget_totals", "since": day_start(day)}, 30.0)
                self.rt.ledger.load(day, reply["totals"], reply.get("cost_totals"))
                if warned:
                    log.info("clrk: today's token usage is read; budgeted routes serve again")
                return
            except Exception as e:
                if not warned:
                    log.error("clrk: cannot read today's token usage from the store (%s); budgeted routes answer "
                              "503 until it can be read (retrying)", e)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def response(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.recorded or flow.websocket is not None:
            return  # a WebSocket session is recorded when it ends (WebSocketSessions)
        loop = self._loop
        if loop is None:  # not running (in-process tests): at once
            self.rt.finish(flow, tx)
        else:
            # mitmproxy sends the answer as soon as this hook returns: the record (the provider parser's last
            # word, pricing, the budget settled, redaction, encoding) is made right after, in the event loop's
            # next turn, ahead of what it reads then: an agent that waits for this answer before its next call
            # finds the budget settled, as before, and has its answer that much sooner (docs/PERFORMANCE.md).
            # Until then the call's reservation stays held, as for any call in flight. A later hook of this flow
            # (an error as the answer is written) finds it not yet recorded and records it itself.
            loop.call_soon(self._finish, flow, tx)

    def _finish(self, flow: http.HTTPFlow, tx: Transaction) -> None:
        try:
            self.rt.finish(flow, tx)
        except Exception:  # as the step's guard would: logged, never lost silently
            failed("response", self.response)

    def error(self, flow: http.HTTPFlow) -> None:
        tx: Transaction | None = flow.metadata.get(METADATA_KEY)
        if tx is None or tx.recorded:
            return
        if flow.response is None and flow.error is not None and tx.decision is not None and tx.decision.allow:
            # mitmproxy ends a connection that stayed silent for tcp_timeout seconds by closing it, and the
            # flow's error then reads "client disconnected". A request sent upstream that long ago and never
            # answered is an upstream timeout: say so in the record.
            sent = flow.request.timestamp_end or flow.request.timestamp_start
            idle = ctx.options.tcp_timeout
            if time.time() - sent >= idle * 0.95 and "disconnect" in flow.error.msg.lower():
                tx.error = f"timeout: the upstream did not answer within {idle} s (tcp_timeout)"
                tx.error_type = "timeout"
        if flow.error is not None and tx.error is None:
            blocked = self.rt.blocked.get(flow.client_conn.id)
            if blocked is not None and blocked in flow.error.msg:  # the flow failed on the refused connection
                tx.error_type = "policy_blocked"
        self.rt.finish(flow, tx)

    async def done(self) -> None:
        if isinstance(self.rt.ledger, SharedLedger):
            with contextlib.suppress(Exception):
                await self.rt.ledger.close()
        if self.rt.sink is not None:
            with contextlib.suppress(Exception):
                await self.rt.sink.stop()
