"""A real redis-server on a free loopback port, its own process and data directory (never a system service).
scripts/setup-redis installs it (scripts/test runs that)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.harness.gateway import free_port


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None):
        self.password = password  # requirepass: clients must AUTH (the URL carries it)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup-redis (scripts/test does)")
        # Append-only (fsync once a second, as production servers usually run; a stopped server writes it all out):
        # a restarted server still has the day (as a production one
        # configured for it would); nothing is saved anywhere else.
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "yes",
                *(["--requirepass", self.password] if self.password else [])]
        self._log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                    s.sendall(auth + b"PING\r\n")
                    reply = b""
                    while reply.count(b"\r\n") < (2 if auth else 1):
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        reply += chunk
                    if reply.endswith(b"+PONG\r\n"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def pause(self) -> None:
        """Stops answering (SIGSTOP) with its port still open: clients time out rather than being refused."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
