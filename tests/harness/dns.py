"""A DNS server on a loopback address: it answers A/AAAA queries for the test names it is given, only ever with
loopback addresses, and every other query with NXDOMAIN (or SERVFAIL): what a resolver says of a name that
does not exist. The gateway is pointed at it by running in its own mount namespace with a resolv.conf naming
it (`resolver_wrapper`), so the C resolver, getaddrinfo and mitmproxy are all real and no query leaves the
machine."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

QTYPE_A, QTYPE_AAAA = 1, 28


class DnsServer:
    """`records` maps a name to its addresses, or to a list of such lists: the n-th A (or AAAA) query of that
    name is answered from the n-th list, the last one repeating (a name that changes its answer: rebinding).
    A name not in `records` gets `rcode` (3 = NXDOMAIN, 2 = SERVFAIL); a known name asked for a type it has no
    address of gets an empty answer."""

    def __init__(self, host: str = "127.0.0.153", rcode: int = 3, records: dict[str, list] | None = None):
        self.host, self.rcode = host, rcode
        self.answers: dict[str, list[list[ipaddress.IPv4Address | ipaddress.IPv6Address]]] = {}
        for name, value in (records or {}).items():
            steps = value if value and isinstance(value[0], list) else [value]
            parsed = [[ipaddress.ip_address(a) for a in step] for step in steps]
            # A test must never make the gateway dial anything but this machine.
            if not all(ip.is_loopback for step in parsed for ip in step):
                raise ValueError(f"{name}: test DNS answers must be loopback addresses, got {steps}")
            self.answers[name.lower().rstrip(".")] = parsed
        self.queries: list[str] = []
        self.asked: dict[tuple[str, int], int] = {}  # (name, qtype) -> how many times
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 53))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def on_free_address(cls, records: dict[str, list], rcode: int = 3) -> DnsServer:
        """On the first free 127.0.53.x (tests of other worktrees may hold 127.0.0.153); OSError if none is."""
        error: OSError | None = None
        for last in range(1, 60):
            try:
                return cls(f"127.0.53.{last}", rcode, records)
            except OSError as e:
                error = e
        assert error is not None
        raise error

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
            reply = self._reply(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def _reply(self, data: bytes) -> bytes | None:
        qid, flags, qdcount = struct.unpack("!HHH", data[:6])
        # The question: labels up to the zero byte, then QTYPE and QCLASS.
        end, labels = 12, []
        while end < len(data) and data[end]:
            labels.append(data[end + 1:end + 1 + data[end]].decode("ascii", "replace"))
            end += 1 + data[end]
        if end + 5 > len(data):
            return None
        question = data[12:end + 5]
        (qtype,) = struct.unpack("!H", data[end + 1:end + 3])
        name = ".".join(labels).lower()
        self.queries.append(name)
        n = self.asked[(name, qtype)] = self.asked.get((name, qtype), 0) + 1
        steps = self.answers.get(name)
        answers = b""
        count = 0
        if steps is not None:
            rcode = 0
            version = {QTYPE_A: 4, QTYPE_AAAA: 6}.get(qtype)
            for ip in steps[min(n, len(steps)) - 1]:
                if ip.version == version:
                    # A pointer to the question's name, type, class IN, TTL 0 (nothing cached), the address.
                    answers += struct.pack("!HHHIH", 0xC00C, qtype, 1, 0, len(ip.packed)) + ip.packed
                    count += 1
        else:
            rcode = self.rcode
        # QR=1, opcode from the query, RD copied, RA=1, RCODE.
        rflags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode
        return struct.pack("!HHHHHH", qid, rflags, 1 if qdcount else 0, count, 0, 0) + question + answers

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class NxDomainServer(DnsServer):
    """A DNS server that knows no name: every query is answered with `rcode`."""

    def __init__(self, host: str = "127.0.0.153", rcode: int = 3):
        super().__init__(host, rcode)


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
