"""A real clickhouse-server for the tests: the Debian package's binary (an old release, 18.16 on bookworm;
scripts/setup-clickhouse installs it), started on free loopback ports with its own data directory and a
user with a password full of quoting characters. No system service is involved."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape

from tests.harness.gateway import free_port

PASSWORD = "p'w\"d@:/%s3cret"  # every character a URL or a SQL literal could trip on


def binary() -> str | None:
    for name in ("clickhouse-server", "clickhouse"):
        path = shutil.which(name)
        if path:
            return path
    return None


class ClickHouseServer:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tcp_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self._write_config()

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (d / sub).mkdir(exist_ok=True)
        # <yandex> is the root the old releases read; current ones accept it too.
        (d / "config.xml").write_text(f"""<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{self.http_port}</http_port>
  <tcp_port>{self.tcp_port}</tcp_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>104857600</mark_cache_size>
  <uncompressed_cache_size>0</uncompressed_cache_size>
  <max_concurrent_queries>32</max_concurrent_queries>
  <timezone>UTC</timezone>
</yandex>
""")
        (d / "users.xml").write_text(f"""<yandex>
  <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
  <users>
    <clrk><password>{escape(PASSWORD)}</password><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></clrk>
  </users>
  <quotas><default></default></quotas>
</yandex>
""")

    def url(self, database: str = "clrk", scheme: str = "clickhouse", **opts) -> str:
        port = self.tcp_port if scheme == "clickhouse" else self.http_port
        query = "&".join(f"{k}={v}" for k, v in opts.items())
        return f"{scheme}://clrk:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/{database}" + (f"?{query}" if query else "")

    def start(self, timeout: float = 60.0) -> ClickHouseServer:
        exe = binary()
        assert exe, "clickhouse-server is not installed (scripts/setup-clickhouse)"
        argv = [exe, f"--config-file={self.dir / 'config.xml'}"] if exe.endswith("-server") else \
               [exe, "server", f"--config-file={self.dir / 'config.xml'}"]
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=open(self.dir / "stdout.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready = it answers a query on its native port
            if self.proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited with {self.proc.returncode}: {self.errors()}")
            if self.answers():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"clickhouse-server did not start: {self.errors()}")

    def answers(self) -> bool:
        from clickhouse_driver import Client

        try:
            with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1):
                pass
            Client("127.0.0.1", port=self.tcp_port, user="clrk", password=PASSWORD, connect_timeout=2).execute("SELECT 1")
            return True
        except Exception:
            return False

    def query(self, sql: str) -> list[tuple]:
        from clickhouse_driver import Client

        c = Client("127.0.0.1", port=self.tcp_port, user="clrk", password=PASSWORD)
        try:
            return c.execute(sql)
        finally:
            c.disconnect()

    def kill(self) -> None:
        """Gone at once, as a crashed or unplugged server is (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def errors(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""
