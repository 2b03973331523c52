"""The proxy's end of the recorder: records are queued in memory and shipped in batches over the recorder's
Unix socket, from the event loop, without ever blocking it.

Per record the proxy pays one msgpack encode (the record is bytes from then on: it keeps no mitmproxy
object alive and gives the garbage collector nothing to traverse while it waits) and a list append; per
batch (every BATCH_INTERVAL or BATCH_SIZE records) one non-blocking socket write of the records joined.
If the recorder is slow, the socket's write buffer grows to HIGH_WATER and records wait here instead,
bounded by MAX_PENDING (oldest dropped, counted, logged).
If the recorder dies it is restarted and the queue shipped to the new one.

A record msgpack refuses (a lone surrogate from a JSON body, an integer past 64 bits from an upstream) is
made encodable (`wire.encodable`) and shipped still: only on that failure path, never for the others. What is
lost here anyway is reported to the recorder (`lost`), whose count `clrk status` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from clrk import escape, storeref, wire
from clrk.snapshot import Snapshot

log = logging.getLogger("clrk.sink")

BATCH_SIZE = 512
BATCH_INTERVAL = 0.05
HIGH_WATER = 16 * 1024 * 1024
MAX_PENDING = 100_000
START_TIMEOUT = 20.0
SPAWN_AFTER_HELD = 1.0  # seconds without spawning once a recorder found the store held by another


class RecordSink:
    def __init__(self, db_path: str, worker: tuple[int, int] | None = None):
        """`worker`: (index, restarts) of a worker of `clrk run --workers N`, said in the hello (for `clrk
        status`); its recorder then lives as long as the supervisor (this process's parent), not this worker."""
        self.db_path = db_path if storeref.is_clickhouse(db_path) else str(Path(db_path).resolve())
        self.db_name = storeref.display(self.db_path)  # what logs may say (a URL's password is not in it)
        self.socket_path = wire.socket_path(self.db_path)
        self.pending: list[bytes] = []  # records, each msgpack-encoded
        self.dropped = 0
        self.unreported = 0  # of `dropped`, not yet reported to the recorder
        self.proc: subprocess.Popen | None = None
        self.worker = worker
        self._no_spawn_before = 0.0  # after a recorder that found another one holding the store (status 3)
        self.config: dict | None = None
        self.budget_store: dict | None = None  # the shared budget store's state, for `clrk status`
        # called on every (re)connection, right after the hello: messages to send first (the budget ledger's)
        self.on_connect: list[Callable[[], list[dict]]] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._connecting: asyncio.Task | None = None
        self._read_task: asyncio.Task | None = None
        self._closing = False

    # ---------------------------------------------------------------- connection

    async def start(self) -> None:
        """Connects to the recorder for this DB file, starting one if none is running."""
        await self._connect()

    def _spawn(self) -> None:
        storeref.local_dir(self.db_path).mkdir(parents=True, exist_ok=True)
        # Workers of one supervisor share one recorder, which must outlive any one of them: it follows the
        # supervisor. Several workers may spawn at once; the recorder's lock lets one run (the others exit 3).
        parent = os.getppid() if self.worker is not None else os.getpid()
        # The store travels in the environment, not on the command line: a ClickHouse URL holds a password,
        # and every local user can read command lines.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clrk.recorder", "--socket", self.socket_path, "--parent-pid", str(parent)],
            env={**os.environ, "CLRK_RECORDER_DB": self.db_path},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # the proxy decides when it stops, not the terminal's Ctrl-C
        )
        log.info("started recorder %d for %s", self.proc.pid, self.db_name)

    async def _connect(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path, limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc is None or self.proc.poll() is not None:
                    if self.proc is not None and self.proc.returncode not in (0, 3, None):
                        log.error("recorder exited with status %s; starting another", self.proc.returncode)
                    if self.proc is not None and self.proc.returncode == 3 and self._no_spawn_before == 0.0:
                        # another process holds the store (most often: another worker's recorder, starting):
                        # wait for its socket a while instead of spawning again every 50 ms
                        self._no_spawn_before = time.monotonic() + SPAWN_AFTER_HELD
                    if time.monotonic() >= self._no_spawn_before:
                        self._no_spawn_before = 0.0
                        self._spawn()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the recorder for {self.db_name} did not start within {START_TIMEOUT:.0f}s (see its log above)"
                    ) from None
                await asyncio.sleep(0.05)
        hello = {"t": "hello", "role": "proxy", "pid": os.getpid()}
        if self.worker is not None:
            hello.update(worker=self.worker[0], restarts=self.worker[1])
        self._writer.write(wire.pack(hello))
        for hook in self.on_connect:
            for message in hook():
                self._writer.write(wire.pack(message))
        if self.config is not None:
            self._writer.write(wire.pack(self.config))
        if self.budget_store is not None:
            self._writer.write(wire.pack(self.budget_store))
        self._read_task = asyncio.create_task(self._read_replies(self._reader))
        if self.pending:
            self._ship()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while (msg := await wire.read_message(reader)) is not None:
                fut = self._replies.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (wire.WireError, ConnectionError, asyncio.IncompleteReadError):
            pass
        self._writer = None
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(ConnectionError("recorder connection lost"))
        self._replies.clear()
        if not self._closing:
            log.warning("lost the recorder connection; reconnecting")
            self._reconnect_soon()

    def reconnect_soon(self) -> None:
        """Keeps trying to reach (or start) the recorder in the background."""
        self._reconnect_soon()

    def _reconnect_soon(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closing and self._writer is None:
            try:
                await self._connect()
            except Exception as e:  # keep trying; records wait (bounded) meanwhile
                log.error("recorder unavailable: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---------------------------------------------------------------- records

    def submit(self, record: Snapshot) -> None:
        """Queues one record; called on the event loop for every transaction."""
        try:
            self.pending.append(wire.pack_record(record))
        except Exception as e:  # a value msgpack cannot carry: mended here, off the path every other record takes
            data = self._encode_anyway(record, e)
            if data is None:
                self._lost(1)
                return
            self.pending.append(data)
        if len(self.pending) >= BATCH_SIZE:
            self._ship()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_INTERVAL, self._ship)

    def _encode_anyway(self, record: dict, error: Exception) -> bytes | None:
        """The record encoded with what msgpack refused turned into what it carries (`wire.encodable`), and
        what could not be said so in `incomplete`; None if even that fails."""
        ids = wire.record_ids(record)
        try:
            left_out: list[str] = []
            safe = wire.encodable(record, left_out)
            if left_out:
                safe["incomplete"] = f"proxy: {', '.join(left_out)} could not be encoded ({type(error).__name__})"
                log.warning("clrk: record %s is shipped without %s: they could not be encoded (%s: %s)", ids,
                            ", ".join(left_out), type(error).__name__, escape.printable(str(error)[:200]))
            return wire.pack_record(safe)
        except Exception as e:
            log.error("clrk: record %s could not be encoded and is lost (%s: %s)", ids, type(e).__name__,
                      escape.printable(str(e)[:200]))
            return None

    def _lost(self, n: int) -> None:
        self.dropped += n
        self.unreported += n
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_INTERVAL, self._ship)

    def _ship(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending and not self.unreported:
            return
        w = self._writer
        if w is None or w.is_closing() or w.transport.get_write_buffer_size() > HIGH_WATER:
            self._bound()
            if w is None and not self._closing:
                self._reconnect_soon()
            else:
                self._timer = asyncio.get_running_loop().call_later(BATCH_INTERVAL, self._ship)
            return
        if self.unreported:
            w.write(wire.pack({"t": "lost", "n": self.unreported}))
            self.unreported = 0
        if self.pending:
            rows, self.pending = self.pending, []
            w.write(wire.pack_rows(rows))

    def _bound(self) -> None:
        over = len(self.pending) - MAX_PENDING
        if over > 0:
            del self.pending[:over]
            self.dropped += over
            self.unreported += over
            log.error("recorder is not keeping up: %d records dropped so far", self.dropped)

    def send_config(self, config: dict) -> None:
        """Export settings for the recorder (sent again after every reconnect)."""
        self.config = {"t": "config", **config}
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.pack(self.config))

    def send_budget_store(self, state: dict) -> None:
        """The shared budget store's state (clrk.proxy.budget_store), which `clrk status` shows; sent again
        after every reconnect."""
        self.budget_store = {"t": "budget_store", "state": state}
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.pack(self.budget_store))

    async def request(self, message: dict, timeout: float) -> dict:
        """The recorder's reply to `message`, or TimeoutError after `timeout` seconds. One future and one timer
        (not `asyncio.wait_for`'s task machinery): a budget admission held by the recorder is one of these per
        budgeted call, on the proxy's thread."""
        if self._writer is None:
            raise ConnectionError("not connected to the recorder")
        self._next_id += 1
        rid = self._next_id
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._replies[rid] = fut
        self._writer.write(wire.pack(dict(message, id=rid)))
        timer = loop.call_later(timeout, self._expire, rid, timeout)
        try:
            return await fut
        finally:
            timer.cancel()
            self._replies.pop(rid, None)

    def _expire(self, rid: int, timeout: float) -> None:
        fut = self._replies.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError(f"the recorder did not answer within {timeout:g} s"))

    async def flush(self, timeout: float = 30.0) -> dict:
        """Ships everything queued and waits until the recorder has it in DuckDB."""
        self._ship()
        return await self.request({"t": "flush"}, timeout)

    async def stop(self) -> None:
        """Graceful stop: every queued record reaches DuckDB; the recorder exits if we were its last proxy."""
        self._ship()
        if self.pending and self._writer is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connect(), 10)
        stopping = False
        try:
            reply = await self.flush(60.0)
            if self.pending or reply.get("dropped"):
                log.error("%d records not stored at shutdown", len(self.pending) + reply.get("dropped", 0))
            self._closing = True
            stopping = bool((await self.request({"t": "shutdown"}, 10.0)).get("stopping"))
        except Exception as e:
            log.error("could not flush records at shutdown: %s", e)
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self.proc is not None and stopping:
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                log.error("recorder %d did not exit; terminating it", self.proc.pid)
                self.proc.terminate()
