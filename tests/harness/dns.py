"""A DNS server on a loopback address that answers every query with NXDOMAIN (or SERVFAIL): what a resolver says
of a name that does not exist. The gateway is pointed at it by running in its own mount namespace with a
resolv.conf naming it (`resolver_wrapper`), so the C resolver, getaddrinfo and mitmproxy are all real and no
query leaves the machine."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path


class NxDomainServer:
    def __init__(self, host: str = "127.0.0.153", rcode: int = 3):
        self.host, self.rcode = host, rcode
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 53))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 12:
                continue
            qid, flags, qdcount = struct.unpack("!HHH", data[:6])
            # The question: labels up to the zero byte, then QTYPE and QCLASS.
            end, labels = 12, []
            while end < len(data) and data[end]:
                labels.append(data[end + 1:end + 1 + data[end]].decode("ascii", "replace"))
                end += 1 + data[end]
            question = data[12:end + 5]
            self.queries.append(".".join(labels))
            # QR=1, opcode from the query, RD copied, RA=1, RCODE.
            rflags = 0x8000 | (flags & 0x7900) | 0x0080 | self.rcode
            self.sock.sendto(struct.pack("!HHHHHH", qid, rflags, 1 if qdcount else 0, 0, 0, 0) + question, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def resolver_wrapper(workdir: Path, nameserver: str) -> list[str] | None:
    """A command prefix that runs a program with /etc/resolv.conf naming only `nameserver` (a private mount
    namespace; nothing else changes). None where mount namespaces are not available."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    conf = workdir / "resolv.conf"
    conf.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    probe = subprocess.run([unshare, "-m", "sh", "-c", f"mount --bind {conf} /etc/resolv.conf && cat /etc/resolv.conf"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or nameserver not in probe.stdout:
        return None
    return [unshare, "-m", "sh", "-c", f'mount --bind {conf} /etc/resolv.conf && exec "$@"', "resolver-wrapper"]
