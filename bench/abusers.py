"""The clients of bench/abuse.py: the attackers (each in a process of its own) and the
measured client, with the process figures (CPU, RSS, threads, descriptors) it prints."""

from __future__ import annotations

import contextlib
import heapq
import os
import resource
import selectors
import socket
import statistics
import time
from pathlib import Path
from typing import Any

PHASE_LIMIT_S = 120.0


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- attackers (own process each) --------------------------------------------------------


def hold_slow(port: int, slots: int, peers: int, nice: int, stop: Any, counts: Any) -> None:
    """Keep ``slots`` slowloris connections going until ``stop`` is set.

    ``counts``: [connected now, connects, closed by the agent, 503s, 408s, connect
    failures], shared with the parent.
    """
    raise_nofile()
    os.nice(nice)
    sel = selectors.DefaultSelector()
    due: list[tuple[float, int, int]] = []      # (when, slot, generation): next step
    gen = [0] * slots                           # a close makes older entries stale
    socks: dict[int, socket.socket] = {}
    lines: dict[int, int] = {}
    start = time.monotonic()
    for i in range(slots):                      # ramp: 500 slots a second
        heapq.heappush(due, (start + i / 500, i, 0))

    def closed(i: int, s: socket.socket) -> None:
        """The agent closed slot ``i``: connect again a second later."""
        sel.unregister(s)
        s.close()
        del socks[i]
        counts[0] -= 1
        counts[2] += 1
        gen[i] += 1
        heapq.heappush(due, (time.monotonic() + 1, i, gen[i]))

    while not stop.is_set():
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i, g = heapq.heappop(due)
            if g != gen[i]:
                continue
            s = socks.get(i)
            if s is None:                       # (re)connect and begin a request head
                s = socket.socket()
                s.settimeout(3)
                try:
                    s.bind((f"127.0.0.{2 + i % peers}" if peers > 1 else "127.0.0.1", 0))
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                except OSError:
                    s.close()
                    counts[5] += 1
                    heapq.heappush(due, (now + 1, i, g))
                    continue
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
                socks[i], lines[i] = s, 0
                counts[0] += 1
                counts[1] += 1
            else:                               # one more header line, a second later
                lines[i] += 1
                try:
                    s.send(b"X-Slow-%d: 1\r\n" % lines[i])
                except OSError:
                    closed(i, s)
                    continue
            heapq.heappush(due, (now + 1, i, g))
        for key, _ in sel.select(timeout=0.02):
            i, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                counts[3] += 1
            elif data.startswith(b"HTTP/1.1 408"):
                counts[4] += 1
            closed(i, sock)
    for s in list(socks.values()):
        s.close()


HELD_COUNTS = ("open now", "connects", "closed by the agent", "200s", "503s",
               "other answers", "connect failures")


def hold_authed(port: int, token: str, slots: int, path: str, nice: int, stop: Any,
                counts: Any) -> None:
    """Keep ``slots`` connections open with a valid token, each having sent one
    ``GET path`` (a /v1/health answered, or a follow stream kept reading), until ``stop``
    is set; one the agent closes connects again a second later.

    ``counts``: as ``HELD_COUNTS``, shared with the parent.
    """
    raise_nofile()
    os.nice(nice)
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
           "\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    due: list[tuple[float, int]] = []
    socks: dict[int, socket.socket] = {}
    answered: set[int] = set()
    start = time.monotonic()
    for i in range(slots):                      # ramp: 500 connections a second
        heapq.heappush(due, (start + i / 500, i))
    while not stop.is_set():
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            s = socket.socket()
            s.settimeout(3)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(req)
            except OSError:
                s.close()
                counts[6] += 1
                heapq.heappush(due, (now + 1, i))
                continue
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
            socks[i] = s
            counts[0] += 1
            counts[1] += 1
        for key, _ in sel.select(timeout=0.02):
            i, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data and i not in answered:
                answered.add(i)
                counts[3 if data.startswith(b"HTTP/1.1 200") else
                       4 if data.startswith(b"HTTP/1.1 503") else 5] += 1
            if not data:                        # closed by the agent: again in a second
                sel.unregister(sock)
                sock.close()
                del socks[i]
                answered.discard(i)
                counts[0] -= 1
                counts[2] += 1
                heapq.heappush(due, (time.monotonic() + 1, i))
    for s in list(socks.values()):
        s.close()


def sink(port: Any, stop: Any) -> None:
    """The floor of the ``held`` case: a process that does the least any server must do
    with a connection over its token's cap (accept, read the head, answer 503, close),
    in Python with one selector, at the agent's priority. The attacker aimed at it loads
    the machine as it loads the agent, but none of it is the agent's own work; ``port``
    (a shared value) gets the port it listens on."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    srv.setblocking(False)
    port.value = srv.getsockname()[1]
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    heads: dict[socket.socket, bytearray] = {}
    answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              b"Content-Length: 17\r\nConnection: close\r\n\r\n{\"error\": \"busy\"}")
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.05):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _addr = srv.accept()
                        conn.setblocking(False)
                        heads[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            heads[conn] += data
            if data and b"\r\n\r\n" not in heads[conn]:
                continue
            if data:
                with contextlib.suppress(OSError):
                    conn.sendall(answer)
            sel.unregister(conn)
            del heads[conn]
            conn.close()
    srv.close()


# -- the measured client ---------------------------------------------------------------------


def read_response(s: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before a response")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
        elif k.strip().lower() == b"transfer-encoding":
            chunked = v.strip().lower() == b"chunked"
    if chunked:
        return status, read_chunked(s, bytearray(rest), buf)
    while len(rest) < length:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed in a body")
        rest += data
    buf[:] = rest[length:]
    return status, rest[:length]


def read_chunked(s: socket.socket, rest: bytearray, buf: bytearray) -> bytes:
    """A chunked body (the agent streams log answers so); what follows stays in ``buf``."""
    body = bytearray()

    def need(n: int) -> None:
        while len(rest) < n:
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("closed in a chunked body")
            rest.extend(data)

    while True:
        while b"\r\n" not in rest:
            need(len(rest) + 1)
        line, _, tail = bytes(rest).partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        rest[:] = tail
        need(size + 2)
        body += rest[:size]
        del rest[:size + 2]
        if size == 0:
            buf[:] = rest
            return bytes(body)


def request_bytes(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n")
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def measure(port: int, req: bytes, n: int, fresh: bool, pace_s: float = 0.002
            ) -> tuple[list[float], dict[int | str, int]]:
    """``n`` sequential requests ``req``; latencies in ms and a count per status."""
    lat: list[float] = []
    statuses: dict[int | str, int] = {}
    s: socket.socket | None = None
    buf = bytearray()
    deadline = time.monotonic() + PHASE_LIMIT_S
    for _ in range(n):
        if time.monotonic() > deadline:
            statuses["phase time limit"] = statuses.get("phase time limit", 0) + 1
            break
        t0 = time.perf_counter()
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf.clear()
            s.sendall(req)
            status: int | str = read_response(s, buf)[0]
        except OSError as exc:
            status = type(exc).__name__
            s = None
        lat.append((time.perf_counter() - t0) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        if fresh and s is not None:
            s.close()
            s = None
        time.sleep(pace_s)
    if s is not None:
        s.close()
    return lat, statuses


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 100 else max(xs)


class Series:
    """Latencies and outcomes of one condition, pooled over the rounds, by kind."""

    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {}
        self.statuses: dict[int | str, int] = {}

    def add(self, kind: str, lat: list[float], statuses: dict[int | str, int]) -> None:
        self.lat.setdefault(kind, []).extend(lat)
        for k, v in statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v


# -- process figures --------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    return "?"


def rss_mb(pid: int) -> float:
    kb = status_field(pid, "VmRSS")
    return int(kb) / 1024 if kb.isdigit() else 0.0


def agent_usage(pid: int) -> str:
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return f"threads={status_field(pid, 'Threads')} fds={fds} rss={rss_mb(pid):.0f} MB"
