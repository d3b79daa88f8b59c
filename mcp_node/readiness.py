"""Readiness checks (design §9 ``check``): is a running component serving?

``tcp`` (the default for a component with routes): every route's host port
accepts a connection (what proves an accept is the runtime's: ``Runtime.tcp_check``;
a VM's host port is QEMU's forwarder, not the guest). ``http:/path``: a GET of that
path on the first route's host port answers 2xx. ``none`` (the default without
routes): passes while it runs. Probes go to 127.0.0.1 only, each bounded by the
component's ``check_timeout_s``; ``checks`` decides when they run.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .servicedef import ComponentDef

TIMEOUT_S = 0.5

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
          tcp: TcpProbe | None = None) -> Result:
    """One probe of the component's effective check; never raises."""
    kind = effective(defn)
    ports = [host_ports[r.name] for r in defn.routes if host_ports.get(r.name)]
    if kind == "none":
        return Result(True, "no check")
    if not ports:
        return Result(False, "no host port")
    if kind == "tcp":
        accepts = tcp or connect
        for p in ports:
            why = accepts(p, timeout)
            if why:
                return Result(False, why if len(ports) == 1 else f"port {p}: {why}")
        return Result(True, "accepted")
    return _http(ports[0], kind[len("http:"):], timeout)


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


def connect(port: int, timeout: float) -> str:
    """A plain connect to 127.0.0.1:port: "" when it is accepted, else why not."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return ""
    except OSError as exc:
        return why_failed(exc, timeout)


def _http(port: int, path: str, timeout: float) -> Result:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
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
