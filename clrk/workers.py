"""`clrk run --workers N` (and `clrk dev --workers N`): N gateway processes on one host, one per core.

mitmproxy serves every connection of a process on one thread, so one gateway uses one core. The supervisor
(`python -m clrk.workers`, which `clrk run --workers N` becomes and `clrk dev` starts) runs N gateway
processes — the `python -O -m clrk.proxy ...` command line `clrk run` would exec (clrk/launch.py), plus the
worker options (`worker_argv`) — and nothing else: it proxies no byte.

- **Ports**: every worker binds every listener with SO_REUSEPORT (clrk/proxy/reuseport.py) and Linux spreads
  new connections over them; a connection stays on its worker. Before starting any, the supervisor binds each
  address it was given, plainly (`probe`): one in use (another gateway, by any user) stops it with the message
  a single gateway would give, instead of joining that gateway's group and taking part of its traffic.
  Port 0 cannot be shared and is refused.
- **One recorder**: the workers' sinks share the store's recorder (its lock lets one of them start it, clrk/
  recorder/service.py), which follows the supervisor: it outlives a dead worker and stops after the last
  worker's graceful stop.
- **Restarts**: a worker that exits while the supervisor is not stopping is logged and started again after
  `Backoff` (0.5 s, doubling to 30 s while it keeps dying within HEALTHY_AFTER of its start; back to 0.5 s
  once it ran that long). A worker that fails on its first start with an error status (a policy or a store
  it cannot use) stops the supervisor with that status: a gateway that cannot start does not restart forever.
- **Stop**: SIGTERM or SIGINT (Ctrl-C: only the supervisor gets it, each worker runs in its own process
  group) is passed on as one SIGTERM to each worker, which drains and flushes as a single gateway does; a
  second signal is passed on too (the workers then stop at once). The supervisor exits 0 once all have ended.
  Workers get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG), so none is left holding the ports.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from clrk import balance

MIN_DELAY = 0.5  # seconds before restarting a worker that died
MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0  # a worker that ran this long before it died is restarted after MIN_DELAY again
STOP_TIMEOUT = 120.0  # after SIGTERM: drain (30 s) and the last flush (up to 60 s), then SIGKILL
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


class Backoff:
    """How long to wait before restarting one worker: MIN_DELAY, doubling up to MAX_DELAY while it keeps dying
    within HEALTHY_AFTER seconds of its start, MIN_DELAY again after it ran that long."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self, ran: float) -> float:
        if ran >= HEALTHY_AFTER or self.delay == 0.0:
            self.delay = MIN_DELAY
        else:
            self.delay = min(self.delay * 2, MAX_DELAY)
        return self.delay


def worker_argv(gateway: list[str], workers: int, index: int, restarts: int) -> list[str]:
    """The command line of worker `index`: the gateway's (clrk.launch.gateway_argv), then the worker options
    (last: they win over the same options among the operator's extra arguments)."""
    argv = [*gateway, "--set", f"clrk_workers={workers}", "--set", f"clrk_worker={index}",
            "--set", f"clrk_worker_restarts={restarts}"]
    if not names_budget_store(gateway, os.environ):
        # One ledger for all of them, held by their recorder: N workers each with its own would allow N times
        # every budget. A store the operator named (Redis, in the environment or after --) is kept.
        argv += ["--set", "clrk_budget_store=recorder"]
    return argv


def names_budget_store(gateway: list[str], env: Mapping[str, str]) -> bool:
    """Whether the operator named a budget store: CLRK_BUDGET_STORE, or `--set clrk_budget_store=...`."""
    return bool(env.get("CLRK_BUDGET_STORE")) or any(a.startswith("clrk_budget_store=") for a in gateway)


def supervisor_argv(workers: int, listening: list[str], gateway: list[str]) -> list[str]:
    """The supervisor's command line (`clrk run --workers N` execs it, `clrk dev --workers N` starts it)."""
    argv = [sys.executable, "-m", "clrk.workers", "--workers", str(workers)]
    for where in listening:
        argv += ["--listen", where]
    return [*argv, "--", *gateway]


def split_address(where: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets or not) → (host, port)."""
    host, _, port = where.rpartition(":")
    return host.strip("[]"), int(port)


def probe(listening: list[str]) -> str | None:
    """Binds each "address:port" plainly (no SO_REUSEPORT; SO_REUSEADDR as asyncio's listeners do, so a port
    in TIME_WAIT is free): the reason the first one cannot be used, or None when all can."""
    for where in listening:
        host, port = split_address(where)
        if port == 0:
            return (f"{where}: port 0 (any free port) cannot be shared by workers, each would get its own; "
                    "give a fixed port (--port, or the listener's port in the EgressGateway)")
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            return f"cannot listen on {where}: {e}"
        for family, kind, proto, _, addr in infos:
            with balance.server_socket(family, kind, proto, reuse_port=False) as s:
                try:
                    s.bind(addr)
                except OSError as e:
                    why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                    return (f"cannot listen on {where}: {why} (another gateway or program holds it; stop it or "
                            "choose another port)")
    return None


def _in_child() -> None:
    """In each worker before exec: the signal mask the supervisor blocked is not inherited, and the worker is
    sent SIGTERM if the supervisor dies (it then drains and flushes as on any stop)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float | None = None  # monotonic time of the next start, while it waits for one
    backoff: Backoff = field(default_factory=Backoff)


class Supervisor:
    def __init__(self, gateway: list[str], workers: int, env: dict[str, str] | None = None,
                 say: Callable[[str], None] | None = None):
        self.gateway = gateway
        self.workers = [Worker(i) for i in range(workers)]
        self.env = env
        self.say = say or (lambda m: print(f"clrk: {m}", file=sys.stderr, flush=True))
        self.stopping = False
        self.status = 0
        # Connections kept even across the workers (clrk/balance.py): the load file and the hand-over
        # sockets live here, so a restarted worker takes over its slot and what was sent to it.
        self.loads, self.pairs = balance.make_shared(workers)

    def _start(self, w: Worker) -> None:
        w.restart_at = None
        balance.set_slot(self.loads, w.index, 0)
        value, fds = balance.env_value(self.loads, self.pairs, w.index)
        env = dict(os.environ if self.env is None else self.env, **{balance.ENV: value})
        w.proc = subprocess.Popen(worker_argv(self.gateway, len(self.workers), w.index, w.restarts), env=env,
                                  stdin=subprocess.DEVNULL, process_group=0, preexec_fn=_in_child, pass_fds=fds)
        w.started = time.monotonic()

    def run(self) -> int:
        """Starts the workers and keeps them running until SIGTERM/SIGINT; the exit status."""
        try:
            return self._run()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.loads)

    def _run(self) -> int:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN would reap the workers behind our back
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for w in self.workers:
            self._start(w)
        self.say(f"{len(self.workers)} workers started (pids {', '.join(str(w.proc.pid) for w in self.workers if w.proc)}); "
                 f"supervisor pid {os.getpid()}")
        while not self.stopping:
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            info = signal.sigtimedwait(SIGNALS, timeout) if timeout is not None else signal.sigwaitinfo(SIGNALS)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(info.si_signo).name)
                break
            self._reap()
            now = time.monotonic()
            for w in self.workers:
                if w.restart_at is not None and w.restart_at <= now and not self.stopping:
                    self._start(w)
                    self.say(f"worker {w.index} restarted (pid {w.proc.pid if w.proc else '?'}, restart {w.restarts})")
        return self.status

    def _reap(self) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code, ran = w.proc.returncode, time.monotonic() - w.started
            balance.set_slot(self.loads, w.index, -1)  # nothing is handed to it until it is back
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            w.proc = None
            if code > 0 and w.restarts == 0 and ran < HEALTHY_AFTER:
                self.say(f"worker {w.index} {how} on its first start (its log above says why); stopping the others")
                self.status = code
                self._stop(None)
                return
            delay = w.backoff.next(ran)
            w.restarts += 1
            w.restart_at = time.monotonic() + delay
            self.say(f"worker {w.index} {how} after {ran:.1f} s; its transactions in flight are lost; "
                     f"restarting it in {delay:g} s")

    def _stop(self, signame: str | None) -> None:
        """SIGTERM to every worker (they drain and flush), then wait for all; a second signal is passed on."""
        self.stopping = True
        if signame:
            self.say(f"{signame}: stopping {sum(w.proc is not None for w in self.workers)} workers (each lets its "
                     "transactions in flight finish and flushes its records; signal again to stop them at once)")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                self.say(f"workers still running after {STOP_TIMEOUT:g} s; killing them")
                self._signal_all(signal.SIGKILL)
                for w in self.workers:
                    if w.proc is not None:
                        w.proc.wait()
                break
            info = signal.sigtimedwait(SIGNALS, left)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m clrk.workers --workers N [--listen ADDRESS:PORT ...] -- GATEWAY COMMAND ...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m clrk.workers", description="clrk's worker supervisor")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--listen", action="append", default=[], help="an address:port the workers share (probed first)")
    args = p.parse_args(argv[:i])
    gateway = argv[i + 1:]
    if args.workers < 2 or not gateway:
        p.error("--workers must be 2 or more, and the gateway's command line must follow --")
    problem = probe(args.listen)
    if problem is not None:
        print(f"clrk: {problem}; nothing was started", file=sys.stderr, flush=True)
        return 1
    return Supervisor(gateway, args.workers, dict(os.environ)).run()


if __name__ == "__main__":
    sys.exit(main())
