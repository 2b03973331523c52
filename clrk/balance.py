"""Client connections kept even across the workers of `clrk run --workers N`.

SO_REUSEPORT (clrk/proxy/reuseport.py) lets Linux pick a worker for each new connection by a hash of its
addresses and ports, and a connection then stays on that worker for its life. For many short connections
that spreads well; for the few long-lived keep-alive connections an agent pool holds, it often does not: 16
connections from one client land 12 and 4 (or worse) about one time in four, measured. The worker holding 12
is then the bottleneck (one core), while the other idles.

So each worker, as it accepts a connection, looks at how many connections every worker holds (one 64-bit
slot per worker in a small shared file, each written only by its own worker) and, when another holds fewer
than it does, hands the new connection over: the socket's file descriptor is sent to that worker over a Unix
datagram socket (SCM_RIGHTS) before a byte of it is read, and that worker serves it as if it had accepted it.
A connection is handed over at most once (the receiver serves what it receives); one that cannot be handed
over (the peer's queue full, a send failing) is served where it was accepted. The sender adds the connection to
the receiver's slot just before sending it, so a burst of connections is not all handed to one worker before it
has counted them; the receiver's own count overwrites that guess as soon as it changes (each slot's truth is its
worker's), and, written before the send, the guess cannot land after the receiver has counted the connection.

The supervisor (clrk/workers.py) makes the shared file and one datagram socket pair per worker, keeps them
open across restarts (what was sent to a worker that died waits for the worker that replaces it), and marks
a dead worker's slot -1 so nothing is handed to it meanwhile. Its worker gets them as inherited descriptors
named in CLRK_WORKER_BALANCE ("<file>;<inbox fd>;<outbox fd of worker 0>,<outbox fd of worker 1>,...").

A connection arriving on a listener the receiver does not have (a policy edit adding a listener reaches the
workers a moment apart) is sent back, and its first worker serves it.
"""

from __future__ import annotations

import array
import asyncio
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("clrk")

ENV = "CLRK_WORKER_BALANCE"
SLOT = struct.Struct("q")
ACCEPT_BURST = 64  # connections accepted per wake-up of one listening socket (asyncio accepts up to its backlog)
_MSG = 512  # bytes of a hand-over message: "<from worker> <bounced 0/1> <listen host> <listen port>"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


def server_socket(family: int, kind: int, proto: int, reuse_port: bool) -> socket.socket:
    """A socket set up to be bound as a listener the way asyncio's are (SO_REUSEADDR, IPv6 v6-only), and
    shared with the other workers (SO_REUSEPORT) when `reuse_port`: the supervisor's probe binds one plainly,
    each worker its listeners shared (clrk/proxy/reuseport.py)."""
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s


def make_shared(workers: int, directory: str | None = None) -> tuple[str, list[tuple[socket.socket, socket.socket]]]:
    """The supervisor's side: the load file (every slot 0) and a (receiving, sending) datagram pair per worker."""
    d = directory or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)
    import tempfile

    fd, path = tempfile.mkstemp(prefix="clrk-loads-", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(b"\0" * SLOT.size * workers)
    pairs = []
    for _ in range(workers):
        inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.setblocking(False)
        outbox.setblocking(False)
        pairs.append((inbox, outbox))
    return path, pairs


def set_slot(path: str, index: int, value: int) -> None:
    """The supervisor's write of a worker's slot: 0 as it starts it, -1 once it is gone."""
    with open(path, "r+b") as f:
        f.seek(index * SLOT.size)
        f.write(SLOT.pack(value))


def open_connections(pid: int, index: int) -> int | None:
    """What worker `index` (process `pid`) counts as its open client connections, read from the load file named
    in its environment (`clrk status`); None when that cannot be read (another user's process, no balancing)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        prefix = ENV.encode() + b"="
        value = next(e[len(prefix):] for e in env if e.startswith(prefix))
        with open(value.split(b";", 1)[0].decode(), "rb") as f:
            f.seek(index * SLOT.size)
            (n,) = SLOT.unpack(f.read(SLOT.size))
    except (OSError, StopIteration, UnicodeDecodeError, struct.error):
        return None
    return n if n >= 0 else None


def env_value(path: str, pairs: list[tuple[socket.socket, socket.socket]], index: int) -> tuple[str, list[int]]:
    """CLRK_WORKER_BALANCE for worker `index`, and the descriptors it must inherit."""
    inbox = pairs[index][0].fileno()
    outs = [p[1].fileno() for p in pairs]
    return f"{path};{inbox};{','.join(map(str, outs))}", [inbox, *outs]


class Balancer:
    """A worker's side: its count of open client connections, the hand-over on accept, and its inbox."""

    def __init__(self, index: int, path: str, inbox: socket.socket, outboxes: list[socket.socket]):
        self.index = index
        self.workers = len(outboxes)
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), SLOT.size * self.workers)
        self.inbox = inbox
        self.outboxes = outboxes
        self.count = 0
        # listening (host, port) -> (its socket, its handler); a closed socket (a listener a reload removed) is none
        self.listeners: dict[tuple[str, int], tuple[socket.socket, Handler]] = {}
        self.handed_over = 0  # connections this worker gave to another
        self.received = 0  # connections another worker gave to this one
        self._reading = False
        self._write()

    @classmethod
    def from_env(cls, index: int, env: str | None = None) -> Balancer | None:
        value = os.environ.get(ENV) if env is None else env
        if not value:
            return None
        try:
            path, inbox, outs = value.split(";")
            inbox_sock = socket.socket(fileno=int(inbox))
            out_socks = [socket.socket(fileno=int(fd)) for fd in outs.split(",")]
        except (ValueError, OSError) as e:
            log.warning("clrk: %s is not usable (%s); connections are not balanced across workers", ENV, e)
            return None
        for s in (inbox_sock, *out_socks):
            s.setblocking(False)
        return cls(index, path, inbox_sock, out_socks)

    # ------------------------------------------------------------------ the count

    def _write(self) -> None:
        SLOT.pack_into(self.map, self.index * SLOT.size, self.count)

    def loads(self) -> tuple[int, ...]:
        return struct.unpack_from(f"{self.workers}q", self.map)

    def counted(self, handler: Handler) -> Handler:
        """`handler` (mitmproxy's, which returns when the connection ends), giving back the connection's place in
        this worker's count when it does. The place is taken as the connection is accepted or received (`_serve`):
        connections arriving together are counted before the next one is placed, not once each is served."""
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            finally:
                self._left()

        return serve

    def _left(self) -> None:
        self.count -= 1
        self._write()

    def target(self) -> int | None:
        """The worker to hand a new connection to: the one holding the fewest, if it holds fewer than this one."""
        best, fewest = None, self.count
        for j, n in enumerate(self.loads()):
            if j != self.index and 0 <= n < fewest:
                best, fewest = j, n
        return best

    # ------------------------------------------------------------------ accepting

    def listen(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, handler: Handler) -> None:
        """Accepts on `sock` (a listening socket of this worker's SO_REUSEPORT group) with hand-over."""
        host, port = sock.getsockname()[:2]
        self.listeners[(host, port)] = (sock, handler)
        loop.add_reader(sock.fileno(), self._accept, loop, sock, (host, port), handler)
        if not self._reading:
            loop.add_reader(self.inbox.fileno(), self._receive, loop)
            self._reading = True

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, where: tuple[str, int], handler: Handler) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: asyncio logs and carries on, so do we
                log.error("clrk: accepting a connection failed: %s", e)
                return
            conn.setblocking(False)
            # What other workers handed here first: counted, they are part of this worker's load (otherwise its
            # own count, written as it serves what it accepted, would hide them from the sender).
            self._receive(loop)
            j = self.target()
            if j is not None:
                # Counted for it before it is sent: its own count, written as it serves the connection, replaces
                # this. Written after, the guess could land once that worker (another process, on another core)
                # had already counted the connection, and count it twice until its count next changed.
                at = j * SLOT.size
                n = SLOT.unpack_from(self.map, at)[0]
                if n >= 0:
                    SLOT.pack_into(self.map, at, n + 1)
                if self._send(j, conn, where, bounced=False):
                    self.handed_over += 1
                    continue
                if n >= 0 and SLOT.unpack_from(self.map, at)[0] == n + 1:  # not sent: the guess taken back
                    SLOT.pack_into(self.map, at, n)
            self._serve(loop, conn, handler)

    def _send(self, j: int, conn: socket.socket, where: tuple[str, int], bounced: bool) -> bool:
        msg = f"{self.index} {int(bounced)} {where[0]} {where[1]}".encode()
        try:
            self.outboxes[j].sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])
        except OSError:  # its queue is full, or it cannot be reached: served here
            return False
        conn.close()  # this process's copy; the connection lives on in the message, then in the receiver
        return True

    def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                msg, anc, _, _ = self.inbox.recvmsg(_MSG, socket.CMSG_SPACE(SLOT.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("clrk: receiving a connection from another worker failed: %s", e)
                return
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds[1:]:  # one per message is sent; anything more is not ours to keep
                os.close(fd)
            if not fds:
                continue
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(False)
            try:
                sender, bounced, host, port = msg.decode().rsplit(" ", 3)
                where = (host, int(port))
                sender_i = int(sender)
            except ValueError:
                conn.close()
                continue
            listener = self.listeners.get(where)
            handler = listener[1] if listener is not None and listener[0].fileno() != -1 else None
            if handler is None:
                self._write()  # the sender counted it here: not so
                # Not listening there (yet, or any more): back to the worker that accepted it, which serves it.
                if bounced == "0" and 0 <= sender_i < self.workers and self._send(sender_i, conn, where, bounced=True):
                    continue
                log.warning("clrk: a connection handed over for %s:%s found no listener there; closed", host, port)
                conn.close()
                continue
            self.received += 1
            self._serve(loop, conn, handler)

    def _serve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, handler: Handler) -> None:
        """Serves an accepted socket as asyncio.start_server would (a StreamReader/Writer pair for `handler`, which
        is `counted`): counted from now."""
        self.count += 1
        self._write()

        def protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), handler, loop=loop)

        def done(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is not None:
                self._left()  # never served: its handler will not give its place back
                if not task.cancelled():
                    log.error("clrk: serving an accepted connection failed: %s", task.exception())

        loop.create_task(loop.connect_accepted_socket(protocol, conn)).add_done_callback(done)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("clrk: serving an accepted connection failed: %s", task.exception())


balancer: Balancer | None = None  # this worker's, once `start` found CLRK_WORKER_BALANCE


def start(index: int) -> Balancer | None:
    """Called once the worker knows its index (PolicyLoader.configure), before any listener opens."""
    global balancer
    if balancer is None:
        balancer = Balancer.from_env(index)
    return balancer
