"""A `clrk dev` session: the OTLP receiver in this process, the gateway as a child teeing to it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from clrk import storeref, wire
from clrk.cli.dev.receiver import DEFAULT_PORT, OtlpReceiver
from clrk.launch import gateway_argv, gateway_env, stop_gateway
from clrk.proxy.budget import day_start, utc_day
from clrk.workers import supervisor_argv


class DevSession:
    def __init__(self, policies: str, db: str, certs: str, ports: list[int], otlp_port: int = DEFAULT_PORT,
                 host: str = "", log_path: str | None = None, listening: list[str] | None = None, workers: int = 1):
        self.policies, self.db, self.certs, self.ports, self.host = policies, db, certs, ports, host
        # Where agents reach the gateway ("address:port" each): the policy's listeners unless --port says one.
        self.listening = listening or [f"{host or '127.0.0.1'}:{p}" for p in ports]
        self.otlp_port = otlp_port
        self.workers = workers  # over 1: the supervisor of `clrk run --workers` is the child (clrk/workers.py)
        self.log_path = Path(log_path or storeref.local_dir(db) / "clrk-dev.log")  # beside the DuckDB file
        self.receiver: OtlpReceiver | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> DevSession:
        self.receiver = OtlpReceiver(port=self.otlp_port).start()
        argv = gateway_argv(self.policies, self.db, self.certs, self.ports, self.host, self.receiver.endpoint, [])
        if self.workers > 1:
            argv = supervisor_argv(self.workers, self.listening, argv)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        # The gateway's own log goes to a file: the terminal belongs to the UI.
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=gateway_env(self.db))
        sock = wire.socket_path(self.db)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                said = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"the gateway exited with status {self.proc.returncode} ({said[0]}); see {self.log_path}")
            if wire.recorder_ready(sock):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the gateway did not start within {timeout:.0f}s; see {self.log_path}")

    def read_spend(self) -> tuple[list[dict], list[dict]]:
        """Today's spend by agent, route and model, and the budget pools."""
        since = day_start(utc_day(time.time()))
        try:
            with wire.BlockingClient(wire.socket_path(self.db), timeout=5) as c:
                spend = c.request({"t": "spend", "query": {"by": ["agent", "route", "model"], "since": "24h", "usd": True}})["rows"]
                budgets = c.request({"t": "budgets", "query": {"since": since}})["rows"]
            return spend, budgets
        except (OSError, wire.WireError):
            return [], []

    def status(self) -> str:
        """The header's part about this session: where agents point, and where the OTLP tee listens."""
        first = self.listening[0] if self.listening else "127.0.0.1:8080"
        address, port = first.rsplit(":", 1)
        host = "localhost" if address.strip("[]") in ("0.0.0.0", "::") else address  # a wildcard is reached locally
        workers = f" ({self.workers} workers)" if self.workers > 1 else ""
        out = (f"proxy {', '.join(self.listening) or first}{workers} | "
               f"HTTPS_PROXY=http://<namespace>.<agent>:<token>@{host}:{port}")
        r = self.receiver
        return out + (f" | OTLP {r.endpoint}" if r else "")

    def stop(self) -> None:
        stop_gateway(self.proc)
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
