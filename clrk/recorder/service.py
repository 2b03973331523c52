"""The recorder: a process of its own that owns the DuckDB file and the OTLP exporters.

Why a separate process (and not a thread in mitmproxy's): mitmproxy serves every connection on one thread,
and a thread of ours would still hold the GIL while it builds spans (~190 µs each) and Arrow batches.
A process runs on the other core. It is also the only way to honour DuckDB's one-writer-process rule while
`clrk records` reads (the CLI asks the recorder over its socket), and the shape that lets several proxy
worker processes on one machine share one store and one exporter: they are just more socket clients.

Lifecycle: the first proxy for a DB file spawns it (`python -m clrk.recorder`); it exits on a `shutdown`
message when no other proxy is connected, or on its own once its parent is gone and no proxy has been
connected for a few seconds (the parent of a worker's recorder is its supervisor, `clrk run --workers`:
a dead worker's records stay and the others, or its restart, keep the recorder). Several proxies may spawn
one at once (workers starting together): each recorder first takes an exclusive lock on a file beside the
socket (`clrk/recorder/lock.py`), before it touches the socket or the store; one that finds it held exits
with status 3, which its proxy takes as "another recorder is starting" and connects to that one. Rows
received are written within FLUSH_INTERVAL; a `flush` request is
answered only once everything received before it is in DuckDB.

Nothing a transaction carries keeps its record out, nor another's: a record that cannot be built whole, or
whose value fits no column, is stored as far as it can be (`clrk.record.incomplete` says what is missing)
and counted (`incomplete`); one that has not even usable ids and a start time is counted as `dropped` and
logged with whatever ids it has. Proxies report the records they lost (`lost` messages) into the same count.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import sys
import time
from collections import deque

from clrk import attributes as A
from clrk import storeref
from clrk.attributes import SENSITIVE_HEADERS, SENSITIVE_QUERY_PARAMS
from clrk.escape import printable
from clrk.recorder.expand import expand, mcp_rows, salvage
from clrk.recorder.export import Exporter
from clrk.recorder.ledger import RecorderLedger
from clrk.recorder.lock import HELD, lock_store
from clrk.recorder.spool import Spool
from clrk.recorder.store import StoreError
from clrk.recorder.stores import open_store
from clrk.redact import Redactor
from clrk.wire import WireError, pack, read_message, record_ids

log = logging.getLogger("clrk.recorder")

FLUSH_INTERVAL = 0.2
MAX_BUFFERED_ROWS = 200_000  # while DuckDB cannot be written; oldest rows go first past this
FLUSH_CHUNK_ROWS = 512  # rows expanded, stored and exported together
FLUSH_CHUNK_BYTES = 16 * 1024 * 1024  # ... and their captured bodies (a chunk holds at least one row)
ORPHAN_GRACE = 3.0


class _Parent:
    """Whether the process the recorder follows still runs: a pidfd (no pid-reuse race; it need not be this
    process's parent: a worker's recorder follows the supervisor)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.fd: int | None = None
        self.gone = False
        if pid is not None:
            try:
                self.fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.gone = True
            except OSError:  # no pidfd (old kernel): the parent test of before
                self.fd = None

    def alive(self) -> bool:
        if self.pid is None:
            return True
        if self.gone:
            return False
        if self.fd is None:
            return os.getppid() == self.pid
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        self.gone = bool(p.poll(0))  # readable once the process has exited
        return not self.gone


def _body_bytes(raw) -> int:
    """The captured body bytes a transaction's facts carry (0 for facts of another shape: `salvage` reads those)."""
    try:
        return len(raw["req_body"][1] or b"") + len(raw["resp_body"][1] or b"")
    except Exception:
        return 0


class Recorder:
    def __init__(self, db_path: str, socket_path: str, parent_pid: int | None):
        self.db_path = db_path
        self.socket_path = socket_path
        self.parent_pid = parent_pid
        self.parent = _Parent(parent_pid)
        self.store = open_store(db_path)
        self.db_name = self.store.name  # for logs and status: a ClickHouse URL without its password
        # ClickHouse is a server that can be away: what waits for it is also kept on disk (`Spool`), so a
        # recorder stopped or killed meanwhile loses nothing; the next one sends it first.
        self.spool = Spool(storeref.local_dir(db_path) / "spool.msgpack") if storeref.is_clickhouse(db_path) else None
        self.exporter = Exporter(store_stats=lambda: (self.written, self.dropped))
        self.buffer: deque[dict] = deque()  # raw transaction facts, expanded into records when written
        self.unwritten: list[dict] = []  # records the store refused, retried (bounded: MAX_BUFFERED_ROWS)
        if self.spool is not None:
            spooled = self.spool.load()
            self.unwritten = spooled[-MAX_BUFFERED_ROWS:]
            if self.unwritten:
                log.warning("%d records spooled while %s was unreachable are sent first", len(self.unwritten),
                            self.db_name)
        self.store_error: str | None = None
        self.spooled = len(self.unwritten)  # of `unwritten`, how many the spool file holds
        self._last_store_log = 0.0
        self.redact_headers: frozenset[str] = SENSITIVE_HEADERS
        self.redact_query: frozenset[str] = SENSITIVE_QUERY_PARAMS
        self.redactor = Redactor()
        self.dropped = len(spooled) - len(self.unwritten) if self.spool is not None else 0  # records not stored:
        # here (or in the spool, past the memory bound), or at a proxy (`dropped_at_proxy` of these)
        self.dropped_at_proxy = 0
        self.incomplete = 0  # records stored without some of their values (clrk.record.incomplete says which)
        self.written = 0
        self.proxies: set[asyncio.StreamWriter] = set()
        # per proxy connection, for `clrk status`: pid, worker index and restarts, connected since, records
        self.proxy_info: dict[asyncio.StreamWriter, dict] = {}
        self.budget_stores: dict[asyncio.StreamWriter, dict] = {}  # per proxy: its shared budget store, if any
        self.last_proxy_seen = time.monotonic()
        self.stop_event = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        # budgets of gateways run with clrk_budget_store=recorder (clrk.recorder.ledger); idle otherwise
        self.ledger = RecorderLedger(self._seed_totals)

    async def flush(self) -> None:
        """Writes every buffered row to DuckDB, then hands them to the exporters, a chunk at a time (`_take`).
        Rows that cannot be written (disk full, file gone read-only) wait in a bounded spool and are retried
        every tick, the store reopened first: DuckDB gives up on a database after some I/O errors."""
        async with self.flush_lock:
            todo = len(self.buffer)  # the rows here now: later ones wait for the next flush, so a flush ends
            while True:
                if not self.buffer and not self.unwritten:
                    return
                raws = self._take(todo)
                todo -= len(raws)
                if not await self._write(raws):
                    # The store refused them: the rest of this flush waits with them, one attempt a tick.
                    rest = [self.buffer.popleft() for _ in range(min(todo, len(self.buffer)))]
                    if rest:
                        rows = await asyncio.to_thread(self._expand, rest)
                        self.store.stamp(rows)
                        await self._keep(self.unwritten + rows)
                    return
                if todo <= 0:
                    return

    def _take(self, most: int) -> list[dict]:
        """The oldest buffered rows, at most `most`, FLUSH_CHUNK_ROWS or (past the first) FLUSH_CHUNK_BYTES of
        bodies: a burst is written, and exported, a chunk at a time, so what the recorder (and DuckDB) holds at
        once stays bounded."""
        raws: list[dict] = []
        size = 0
        buffer = self.buffer
        while buffer and len(raws) < most and len(raws) < FLUSH_CHUNK_ROWS:
            size += _body_bytes(buffer[0])
            if raws and size > FLUSH_CHUNK_BYTES:
                break
            raws.append(buffer.popleft())
        return raws

    async def _write(self, raws: list[dict]) -> bool:
        """Expands, stores and exports `raws` (after the rows that wait); False if the store refused them."""
        rows = self.unwritten + await asyncio.to_thread(self._expand, raws)
        self.unwritten = []
        self.store.stamp(rows)  # before anything can fail: a row keeps its place in the order for good
        try:
            if self.store_error is not None:
                await asyncio.to_thread(self.store.reopen)
            stored = await asyncio.to_thread(self.store.insert, rows)
        except Exception as e:
            await self._keep(rows)
            error = self.store.error_text(e)
            now = time.monotonic()
            if self.store_error is None or now - self._last_store_log > 30:
                log.error("cannot write to %s: %s; %d records wait (at most %d), retrying",
                          self.db_name, error, len(self.unwritten), MAX_BUFFERED_ROWS)
                self._last_store_log = now
            self.store_error = error
            return False
        if self.spool is not None and (self.spooled or self.spool.exists()):
            await asyncio.to_thread(self.spool.clear)
            self.spooled = 0
        if self.store_error is not None:
            log.warning("writing to %s again: %d records that waited are stored", self.db_name, len(rows))
            self.store_error = None
        self.dropped += len(rows) - len(stored)
        self.incomplete += sum(1 for r in stored if A.CLRK_RECORD_INCOMPLETE in r)
        self.written += len(stored)
        await asyncio.to_thread(self.exporter.export, stored)
        return True

    async def _keep(self, rows: list[dict]) -> None:
        """`rows` (those waiting first) wait for the store: the newest MAX_BUFFERED_ROWS in memory, and in the
        spool file if there is one."""
        on_disk = min(self.spooled, len(rows))  # rows[:on_disk] are in the spool file already
        self.unwritten = rows[-MAX_BUFFERED_ROWS:]
        trimmed = len(rows) - len(self.unwritten)
        self.dropped += trimmed
        if self.spool is not None and on_disk < len(rows):
            try:
                if await asyncio.to_thread(self.spool.append, rows[on_disk:]):
                    on_disk = len(rows)
            except OSError as se:
                log.error("cannot spool records to %s: %s", self.spool.path, se)
        self.spooled = max(0, on_disk - trimmed)  # of `unwritten`, how many lead it on disk

    def _expand(self, raws: list[dict]) -> list[dict]:
        rows = []
        for raw in raws:
            try:
                row = expand(raw, self.redactor)
                rows.append(row)
                if "mcp" in raw:
                    rows.extend(mcp_rows(raw, row))
                continue
            except Exception as e:  # one malformed transaction must not cost the batch, nor its budget charge
                why = f"recorder: the record could not be built ({type(e).__name__}: {str(e)[:200]})"
            row = salvage(raw, why)
            if row is None:
                self.dropped += 1
                log.error("a record that cannot be stored (no usable transaction ids or start time) is dropped: %s",
                          record_ids(raw), exc_info=True)
                continue
            log.warning("record %s could not be built whole; stored what could be read of it", record_ids(raw),
                        exc_info=True)
            rows.append(row)
        self.exporter.sample(rows)  # before the store: each row says whether its span and log were exported
        return rows

    def _bound_buffer(self) -> None:
        while len(self.buffer) > MAX_BUFFERED_ROWS:
            self.buffer.popleft()
            self.dropped += 1
        if self.dropped:
            log.error("record buffer full: %d records dropped so far", self.dropped)

    async def flush_loop(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), FLUSH_INTERVAL)
            await self.flush()
            if self._orphaned():
                log.info("gateway is gone; recorder exiting")
                self.stop_event.set()

    def _orphaned(self) -> bool:
        if self.proxies:
            self.last_proxy_seen = time.monotonic()
            return False
        return not self.parent.alive() and time.monotonic() - self.last_proxy_seen > ORPHAN_GRACE

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        role = None
        pid = None
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    break
                if not isinstance(msg, dict):
                    raise WireError("a frame that is not a message")
                t = msg.get("t")
                if t in ("budget_admit", "budget_settle", "budget_adopt", "budget_ping"):
                    await self._budget(t, msg, writer, pid)
                elif t == "rows":
                    self.buffer.extend(msg["rows"])
                    self._bound_buffer()
                    if (info := self.proxy_info.get(writer)) is not None:
                        info["records"] += len(msg["rows"])
                elif t == "lost":  # records a proxy could not encode or had to drop from its queue
                    n = int(msg.get("n") or 0)
                    self.dropped += n
                    self.dropped_at_proxy += n
                elif t == "budget_store":  # a proxy's shared budget store: in use, or what it does meanwhile
                    self.budget_stores[writer] = msg.get("state") or {}
                elif t == "hello":
                    role = msg.get("role")
                    pid = msg.get("pid") if isinstance(msg.get("pid"), int) else None
                    if role == "proxy":
                        self.proxies.add(writer)
                        self.proxy_info[writer] = {"pid": msg.get("pid"), "worker": msg.get("worker"),
                                                   "restarts": msg.get("restarts"), "since": time.time(), "records": 0}
                elif t == "config":
                    self.redact_headers = self.redact_headers | frozenset(msg.get("redact_headers") or ())
                    self.redact_query = self.redact_query | frozenset(msg.get("redact_query") or ())
                    self.redactor = Redactor(self.redact_headers, self.redact_query)
                    try:
                        try:  # today's usage per pool, so budget gauges are right before any new record
                            budgets = await asyncio.to_thread(self._read, "budgets", {"since": time.time() // 86400 * 86400})
                        except Exception:
                            budgets = []
                        await asyncio.to_thread(self.exporter.configure, msg.get("gateways") or {}, msg.get("fallback") or "",
                                                budgets)
                    except Exception:  # export is best effort: the store keeps working without it
                        log.exception("cannot set up OTLP export")
                    _freeze()
                elif t == "flush":
                    await self.flush()
                    writer.write(pack({"t": "ok", "id": msg.get("id"), "written": self.written, "dropped": self.dropped}))
                elif t == "query":
                    await self.flush()
                    try:
                        rows = await asyncio.to_thread(self._query, msg.get("query") or {})
                        writer.write(pack({"t": "ok", "id": msg.get("id"), "rows": rows}))
                    except Exception as e:
                        writer.write(pack({"t": "error", "id": msg.get("id"), "message": self.store.error_text(e)}))
                elif t in ("spend", "budgets"):
                    await self.flush()
                    try:
                        rows = await asyncio.to_thread(self._read, t, msg.get("query") or {})
                        writer.write(pack({"t": "ok", "id": msg.get("id"), "rows": rows}))
                    except Exception as e:
                        writer.write(pack({"t": "error", "id": msg.get("id"), "message": self.store.error_text(e)}))
                elif t == "budget_totals":
                    await self.flush()
                    try:  # the proxy retries until the store answers (ClickHouse may be away)
                        totals, cost_totals = await asyncio.to_thread(self._budget_totals, float(msg.get("since") or 0))
                        writer.write(pack({"t": "ok", "id": msg.get("id"), "totals": totals, "cost_totals": cost_totals}))
                    except Exception as e:
                        writer.write(pack({"t": "error", "id": msg.get("id"), "message": self.store.error_text(e)}))
                elif t == "status":
                    await self.flush()
                    writer.write(pack({"t": "ok", "id": msg.get("id"), "written": self.written, "dropped": self.dropped,
                                       "dropped_at_proxy": self.dropped_at_proxy, "incomplete": self.incomplete,
                                       "seq": self.store.next_seq - 1, "unwritten": len(self.unwritten),
                                       "spooled": self.spooled, "store": self.db_name,
                                       "export_dropped": self.exporter.dropped(),
                                       "store_error": self.store_error,
                                       "buffered": len(self.buffer), "proxies": len(self.proxies), "pid": os.getpid(),
                                       "workers": sorted((dict(i) for w, i in self.proxy_info.items() if w in self.proxies),
                                                         key=lambda i: (i["worker"] is None, i["worker"] or 0, i["since"])),
                                       "budget_stores": list(self.budget_stores.values()),
                                       **({"budget_ledger": self.ledger.state()} if self.ledger.holders
                                          or self.ledger.seeded.is_set() else {})}))
                elif t == "budget_pools":  # the budget ledger's pool days, as Redis would hold them (tests, debugging)
                    writer.write(pack({"t": "ok", "id": msg.get("id"), "days": self.ledger.pools.state(),
                                       **self.ledger.state()}))
                elif t == "shutdown":
                    self.proxies.discard(writer)
                    if not self.proxies:
                        self.stop_event.set()
                    writer.write(pack({"t": "ok", "id": msg.get("id"), "stopping": not self.proxies}))
                await writer.drain()
        except (WireError, ConnectionError, asyncio.IncompleteReadError) as e:
            log.warning("dropping a %s connection: %s", role or "peer", e)
        finally:
            self.proxies.discard(writer)
            self.proxy_info.pop(writer, None)
            self.budget_stores.pop(writer, None)
            self.ledger.disconnected(writer)
            writer.close()

    async def _budget(self, t: str, msg: dict, writer: asyncio.StreamWriter, pid: int | None) -> None:
        """A request to the budget ledger: answered from memory, without waiting for a flush; whatever it
        carries, an answer (an error for what is malformed), never the end of the recorder."""
        try:
            if t == "budget_adopt":
                self.ledger.adopt(msg, writer, pid)
                reply: dict = {}
            else:
                await self.ledger.ready()
                if t == "budget_admit":
                    reply = self.ledger.admit(msg, writer, pid)
                elif t == "budget_settle":
                    reply = self.ledger.settle(msg, writer, pid)
                else:
                    self.ledger._holder(msg.get("ledger"), writer, pid)
                    reply = {}
        except Exception as e:
            if t == "budget_adopt":
                log.warning("budget ledger: an adoption from pid %s is refused: %s", pid, printable(str(e))[:200])
            writer.write(pack({"t": "error", "id": msg.get("id"), "message": f"budget ledger: {printable(str(e))[:200]}"}))
            return
        if "id" in msg:
            writer.write(pack({"t": "ok", "id": msg.get("id"), **reply}))

    async def _seed_totals(self, since: float) -> tuple[dict[str, int], dict[str, float]]:
        """The day's usage per pool in the store (what the budget ledger starts from), once what is
        buffered is written."""
        await self.flush()
        if self.store_error is not None:
            raise StoreError(self.store_error)
        return await asyncio.to_thread(self._budget_totals, since)

    def _read(self, what: str, query: dict) -> list[dict]:
        return self.store.spend(query) if what == "spend" else self.store.budgets(float(query.get("since") or 0))

    def _budget_totals(self, since: float) -> tuple[dict[str, int], dict[str, float]]:
        return self.store.totals(since)

    def _query(self, query: dict) -> list[dict]:
        return self.store.records(query)

    async def run(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            server = await asyncio.start_unix_server(self.handle, path=self.socket_path, limit=1 << 20)
        finally:
            os.umask(old_umask)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        # Ctrl-C in the gateway's terminal reaches the whole process group: the proxy then sends its last
        # rows and a shutdown; exiting on SIGINT here would lose them.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        self.ledger.opened = time.monotonic()
        log.info("recorder %d writing %s, listening on %s", os.getpid(), self.db_name, self.socket_path)
        flusher = asyncio.create_task(self.flush_loop())
        await self.stop_event.wait()
        server.close()
        await flusher
        await self.flush()
        if self.buffer or self.unwritten:
            if self.spool is not None and not self.buffer and self.spooled >= len(self.unwritten):
                log.warning("%d records could not be written to %s; they wait in %s for the next recorder",
                            len(self.unwritten), self.db_name, self.spool.path)
            else:
                log.error("%d records could not be written to %s at shutdown", len(self.buffer) + len(self.unwritten),
                          self.db_name)
        self.store.close()
        # Gone only now: while the socket exists, its recorder holds the file.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        await asyncio.to_thread(self.exporter.shutdown, 5.0)
        log.info("recorder stopped: %d records written, %d dropped", self.written, self.dropped)


def _freeze() -> None:
    """What the recorder has built once configured (imports, the store, the export pipelines) lives until the next
    configuration: frozen, the collector's full passes no longer walk it (bench/recorder_cpu.py: 88 → 83 µs per
    record). Unfrozen first, so pipelines a new configuration replaced are collected, not kept frozen forever."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m clrk.recorder", description="clrk's store and export process")
    # A ClickHouse URL holds a password: the proxy hands it over in the environment, not on the command line.
    p.add_argument("--db", default=os.environ.get("CLRK_RECORDER_DB"))
    p.add_argument("--socket", required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if not args.db:
        p.error("--db (or CLRK_RECORDER_DB) is required")
    # Before the socket or the store is touched: one recorder per store, however many proxies spawn one.
    if lock_store(args.socket) is None:
        return HELD
    # The timestamp as mitmproxy writes it in the same log: [HH:MM:SS.mmm], local time.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s.%(msecs)03d] clrk-recorder %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    _quiet_otel_logs()
    try:
        rec = Recorder(args.db, args.socket, args.parent_pid)
    except StoreError as e:
        print(f"clrk-recorder: {e}", file=sys.stderr, flush=True)
        return HELD
    asyncio.run(rec.run())
    return 0


class _OncePerMinute(logging.Filter):
    """A dead OTLP endpoint fails every batch; say so once a minute per logger and level, not twice a second."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("opentelemetry", "urllib3")):
            return True
        key = f"{record.name}:{record.levelno}"  # messages carry changing numbers ("retrying in 1.06s")
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < 60:
            return False
        self.last[key] = now
        return True


def _quiet_otel_logs() -> None:
    f = _OncePerMinute()
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
