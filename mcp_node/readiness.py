"""Readiness checks (design §9 ``check``): is a running component serving?

``tcp`` (the default for a component with routes): every route's host port
accepts a connection (what proves an accept is the runtime's: ``Runtime.tcp_check``;
a VM's host port is QEMU's forwarder, not the guest). ``http:/path``: a GET of that
path on the first route's host port answers 2xx. ``none`` (the default without
routes): passes while it runs. Probes go to 127.0.0.1 (or, for a start-first replace's
new workload on a service network, its own address), each bounded by the
component's ``check_timeout_s``; ``checks`` decides when they run.
"""

from __future__ import annotations

import errno
import http.client
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from .servicedef import ComponentDef

TIMEOUT_S = 0.5
LOOPBACK = "127.0.0.1"

# (host port, timeout) -> "" when the workload accepted the connection, else why not
TcpProbe = Callable[[int, float], str]


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str   # short: "accepted", "HTTP 200", "connection refused", "HTTP 503" ...


def effective(defn: ComponentDef) -> str:
    if defn.check:
        return defn.check
    return "tcp" if defn.routes else "none"


def check(defn: ComponentDef, host_ports: dict[str, int], timeout: float = TIMEOUT_S,
          tcp: TcpProbe | None = None, host: str = LOOPBACK) -> Result:
    """One probe of the component's effective check; never raises. ``host``: where the
    ports are (a start-first replace's new workload on a service network, at its own
    address, while the host ports still reach the current one)."""
    kind = effective(defn)
    ports = ports_of(defn, host_ports)
    if kind == "none":
        return Result(True, "no check")
    if not ports:
        return Result(False, "no host port")
    if kind == "tcp":
        accepts = tcp or partial(connect, host=host)
        for p in ports:
            why = accepts(p, timeout)
            if why:
                return Result(False, why if len(ports) == 1 else f"port {p}: {why}")
        return Result(True, "accepted")
    return _http(ports[0], kind[len("http:"):], timeout, host)


def ports_of(defn: ComponentDef, host_ports: dict[str, int]) -> list[int]:
    """The host ports a check probes, in route order."""
    return [host_ports[r.name] for r in defn.routes if host_ports.get(r.name)]


def probe(defn: ComponentDef, host_ports: dict[str, int]) -> bool:
    return check(defn, host_ports).ok


def why_failed(exc: BaseException, timeout: float) -> str:
    """An OSError as the few words a status line shows."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return (str(exc) or type(exc).__name__)[:80]


def connect(port: int, timeout: float, host: str = LOOPBACK) -> str:
    """A plain connect to host:port: "" when it is accepted, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return why_failed(exc, timeout)


def _http(port: int, path: str, timeout: float, host: str = LOOPBACK) -> Result:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "mcp-agent readiness"})
        status = conn.getresponse().status
        return Result(200 <= status < 300, f"HTTP {status}")
    except OSError as exc:
        return Result(False, why_failed(exc, timeout))
    except http.client.HTTPException as exc:
        return Result(False, f"bad HTTP answer ({type(exc).__name__})")
    finally:
        conn.close()


def connect_all(targets: Mapping[int, float], limit: int = 256) -> dict[int, str]:
    """``connect`` to every port of ``targets`` (port -> timeout) side by side, from this
    thread: non-blocking connects waited on together (at most ``limit`` open at once, a
    node's file limit being 1024 by default), so one that hangs holds up the others only
    by the slot it takes, and a probe costs its connect, not a pool thread's hand-offs."""
    out: dict[int, str] = {}
    todo = deque(targets.items())
    pending: dict[socket.socket, tuple[int, float, float]] = {}
    with selectors.DefaultSelector() as sel:
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    port, timeout = todo.popleft()
                    try:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    except OSError as exc:   # out of descriptors: that probe fails
                        out[port] = why_failed(exc, timeout)
                        continue
                    sock.setblocking(False)
                    err = sock.connect_ex((LOOPBACK, port))
                    if err in (errno.EINPROGRESS, errno.EAGAIN):
                        pending[sock] = (port, timeout, time.monotonic() + timeout)
                        sel.register(sock, selectors.EVENT_WRITE)
                    else:
                        sock.close()
                        out[port] = _answer(err, timeout)
                if pending:
                    _collect(sel, pending, out)
        finally:
            for sock in pending:
                sock.close()
    return out


def _collect(sel: selectors.BaseSelector, pending: dict[socket.socket, tuple[int, float, float]],
             out: dict[int, str]) -> None:
    """One wait on the pending connects: those that ended or timed out go to ``out``."""
    wait = min(d for _p, _t, d in pending.values()) - time.monotonic()
    ready = {k.fileobj for k, _ in sel.select(max(wait, 0.0))}
    now = time.monotonic()
    for sock, (port, timeout, deadline) in list(pending.items()):
        if sock in ready:
            out[port] = _answer(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), timeout)
        elif now >= deadline:
            out[port] = f"timed out after {timeout:g} s"
        else:
            continue
        del pending[sock]
        sel.unregister(sock)
        sock.close()


def _answer(err: int, timeout: float) -> str:
    """A connect's errno in ``connect``'s words ("" accepted)."""
    return "" if err == 0 else why_failed(OSError(err, os.strerror(err)), timeout)
