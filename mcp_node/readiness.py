"""Readiness checks (design §9 ``check``): is a running component serving yet?

``tcp`` (the default for a component with routes): every route's host port
accepts a connection. ``http:/path``: a GET of that path on the first
route's host port answers 2xx. ``none`` (the default without routes): ready
once running. Probes go to 127.0.0.1 only, with short timeouts, because the
monitor thread runs them.
"""

from __future__ import annotations

import http.client
import socket

from .servicedef import ComponentDef

TIMEOUT_S = 0.5


def effective(defn: ComponentDef) -> str:
    if defn.check:
        return defn.check
    return "tcp" if defn.routes else "none"


def probe(defn: ComponentDef, host_ports: dict[str, int]) -> bool:
    check = effective(defn)
    ports = [host_ports[r.name] for r in defn.routes if host_ports.get(r.name)]
    if check == "none":
        return True
    if not ports:
        return False
    if check == "tcp":
        return all(_accepts(p) for p in ports)
    return _http_ok(ports[0], check[len("http:"):])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False


def _http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path, headers={"User-Agent": "mcp-agent readiness"})
        return 200 <= conn.getresponse().status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
