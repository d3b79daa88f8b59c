"""Node L7 proxy router: a small interface, first backend Caddy's JSON admin API.

Each edge route is two objects in Caddy's config, both with a stable ``@id``
so a change is a PATCH/DELETE on ``/id/<id>`` (O(1) admin calls, never a
full reload from here; a POST to a list appends, so it is used only to
create): the HTTP route (host match -> reverse_proxy over TLS with SNI and
verification by the backend's name) and a ``load_files`` entry for its
certificate. Caddy does not reload a changed file at the same path, so
certificate files carry the serial in their name.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import ProxyError

log = logging.getLogger(__name__)

SERVER = "mcp_edge"
ROUTE_PREFIX = "mcp-edge-route-"
CERT_PREFIX = "mcp-edge-cert-"
TAG = "mcp-edge"
_MISSING = object()
_RETRIES = 5


class _Reset(Exception):
    """The admin connection was reset before an answer (Caddy swapping its listener)."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


@dataclass(frozen=True)
class ProxyRoute:
    hostname: str          # public name (TLS SNI and Host match)
    backend_address: str   # Tailnet address dialled
    backend_port: int
    backend_hostname: str  # SNI towards the backend, and the name its cert must carry
    cert_file: str
    key_file: str


class Router(Protocol):
    def add_route(self, route: ProxyRoute) -> None: ...
    def add_routes(self, routes: Sequence[ProxyRoute]) -> None: ...
    def remove_route(self, hostname: str) -> bool: ...
    def list_routes(self) -> dict[str, ProxyRoute]: ...
    def cert_path(self, hostname: str, serial: str) -> Path: ...
    def key_path(self, hostname: str, serial: str) -> Path: ...
    def ping(self) -> None: ...


# -- pure builders (unit-tested) ----------------------------------------------

def route_id(hostname: str) -> str:
    return ROUTE_PREFIX + hostname


def cert_id(hostname: str) -> str:
    return CERT_PREFIX + hostname


def dial(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def build_route(route: ProxyRoute, backend_ca: str = "") -> dict[str, Any]:
    tls: dict[str, Any] = {"server_name": route.backend_hostname}
    if backend_ca:
        tls["root_ca_pem_files"] = [backend_ca]
    return {
        "@id": route_id(route.hostname),
        "match": [{"host": [route.hostname]}],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": dial(route.backend_address, route.backend_port)}],
            "transport": {"protocol": "http", "tls": tls},
            # The backend sees its own name as Host, as SNI: a node proxy (issue 11)
            # routes by it, so a fleet's public hostname reaches the service (issue 12).
            "headers": {"request": {"set": {"Host": [route.backend_hostname]}}},
        }],
        "terminal": True,
    }


def build_cert_entry(route: ProxyRoute) -> dict[str, Any]:
    return {"@id": cert_id(route.hostname), "certificate": route.cert_file,
            "key": route.key_file, "tags": [TAG]}


def build_server(https_port: int) -> dict[str, Any]:
    """Our own server block: TLS from loaded files only, no automatic HTTPS or redirects."""
    return {"listen": [f":{https_port}"], "routes": [],
            "automatic_https": {"disable": True}, "tls_connection_policies": [{}]}


def parse_route(obj: dict[str, Any], certs: dict[str, dict[str, Any]]) -> ProxyRoute | None:
    """Back from Caddy JSON to a ProxyRoute (None for objects that are not ours)."""
    rid = obj.get("@id", "")
    if not isinstance(rid, str) or not rid.startswith(ROUTE_PREFIX):
        return None
    host = rid[len(ROUTE_PREFIX):]
    try:
        handler = obj["handle"][0]
        upstream = handler["upstreams"][0]["dial"]
        sni = handler["transport"]["tls"]["server_name"]
    except (KeyError, IndexError, TypeError):
        return None
    addr, _, port = str(upstream).rpartition(":")
    addr = addr.strip("[]")
    cert = certs.get(host, {})
    return ProxyRoute(hostname=host, backend_address=addr,
                      backend_port=int(port) if port.isdigit() else 0,
                      backend_hostname=str(sni), cert_file=str(cert.get("certificate", "")),
                      key_file=str(cert.get("key", "")))


# -- Caddy ----------------------------------------------------------------------

class CaddyRouter:
    """Routes in Caddy via its admin API; ``admin_calls`` counts requests (benchmarks)."""

    def __init__(self, admin_url: str, https_port: int, cert_dir: Path, *,
                 backend_ca: str = "", timeout: float = 10.0) -> None:
        if not admin_url.startswith(("http://", "https://")):
            raise ProxyError(f"proxy.admin {admin_url!r} is not an http(s) URL")
        self.admin_url = admin_url.rstrip("/")
        self.https_port = https_port
        self.cert_dir = cert_dir
        self.backend_ca = backend_ca
        self.timeout = timeout
        self.admin_calls = 0

    def cert_path(self, hostname: str, serial: str) -> Path:
        return self.cert_dir / f"{hostname}.{serial}.crt"

    def key_path(self, hostname: str, serial: str) -> Path:
        return self.cert_dir / f"{hostname}.{serial}.key"

    def call(self, method: str, path: str, body: Any = None, ok404: bool = False,
             created_id: str = "") -> Any:
        """One admin request, for other route kinds on this Caddy (noderoutes); a 404 with
        ``ok404`` is None for GET, else a sentinel that is not None."""
        return self._call(method, path, body, ok404, created_id)

    def _call(self, method: str, path: str, body: Any = None, ok404: bool = False,
              created_id: str = "") -> Any:
        """One admin request; a connection reset is retried (bounded).

        Caddy replaces its admin listener on every config load, so a request
        racing that swap can be reset without being handled. Every request we
        make is idempotent except POST (append); a POST is only retried after
        checking that its ``created_id`` did not land.
        """
        for attempt in range(_RETRIES):
            try:
                return self._once(method, path, body, ok404)
            except _Reset as exc:
                if attempt == _RETRIES - 1:
                    raise ProxyError(f"Caddy admin API {self.admin_url} unreachable: "
                                     f"{exc.reason}") from exc
                log.debug("caddy %s %s reset (%s), retrying", method, path, exc.reason)
                time.sleep(0.02 * (attempt + 1))
                if method == "POST" and created_id and \
                        self._call("GET", f"/id/{created_id}", ok404=True) is not None:
                    return None
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, method: str, path: str, body: Any, ok404: bool) -> Any:
        url = self.admin_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - checked
                                     headers={"Content-Type": "application/json"})
        self.admin_calls += 1
        log.debug("caddy %s %s", method, path)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()[:300].decode(errors="replace").strip()
            if exc.code == 404 and ok404:
                return None if method == "GET" else _MISSING
            raise ProxyError(f"Caddy admin {method} {path}: HTTP {exc.code} {text}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ConnectionResetError | BrokenPipeError
                          | http.client.RemoteDisconnected):
                raise _Reset(reason) from exc
            raise ProxyError(f"Caddy admin API {self.admin_url} unreachable: {reason}") from exc
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ProxyError(f"Caddy admin {method} {path}: invalid JSON") from exc

    def ping(self) -> None:
        self._call("GET", "/config/")

    def _ensure_skeleton(self, apps: dict[str, Any] | None = None) -> None:
        """Create our server and the load_files list where missing (a fresh Caddy has neither)."""
        if apps is None:
            apps = self._call("GET", "/config/apps") or {}
        if not apps:
            self._call("PUT", "/config/apps", {
                "http": {"servers": {SERVER: build_server(self.https_port)}},
                "tls": {"certificates": {"load_files": []}}})
            return
        http = apps.get("http")
        if not http:
            self._call("PUT", "/config/apps/http",
                       {"servers": {SERVER: build_server(self.https_port)}})
        elif not (http.get("servers") or {}).get(SERVER):
            if http.get("servers") is None:
                self._call("PUT", "/config/apps/http/servers",
                           {SERVER: build_server(self.https_port)})
            else:
                self._call("PUT", f"/config/apps/http/servers/{SERVER}",
                           build_server(self.https_port))
        tls = apps.get("tls")
        if not tls:
            self._call("PUT", "/config/apps/tls", {"certificates": {"load_files": []}})
        elif not tls.get("certificates"):
            self._call("PUT", "/config/apps/tls/certificates", {"load_files": []})
        elif tls["certificates"].get("load_files") is None:
            self._call("PUT", "/config/apps/tls/certificates/load_files", [])

    def add_route(self, route: ProxyRoute) -> None:
        """Create or replace the route; the certificate entry is in place before the route."""
        current = self._call("GET", f"/id/{route_id(route.hostname)}", ok404=True)
        if current is not None:
            old_cert = self._call("GET", f"/id/{cert_id(route.hostname)}", ok404=True)
            if old_cert is None:
                self._call("POST", "/config/apps/tls/certificates/load_files",
                           build_cert_entry(route), created_id=cert_id(route.hostname))
            elif (old_cert.get("certificate"), old_cert.get("key")) != (route.cert_file,
                                                                          route.key_file):
                self._call("PATCH", f"/id/{cert_id(route.hostname)}", build_cert_entry(route))
            new = build_route(route, self.backend_ca)
            if current != new:
                self._call("PATCH", f"/id/{route_id(route.hostname)}", new)
            return
        self._ensure_skeleton()
        if self._call("GET", f"/id/{cert_id(route.hostname)}", ok404=True) is None:
            self._call("POST", "/config/apps/tls/certificates/load_files",
                       build_cert_entry(route), created_id=cert_id(route.hostname))
        else:
            self._call("PATCH", f"/id/{cert_id(route.hostname)}", build_cert_entry(route))
        try:
            self._call("POST", f"/config/apps/http/servers/{SERVER}/routes",
                       build_route(route, self.backend_ca), created_id=route_id(route.hostname))
        except ProxyError:
            self._drop_cert_entries([route])
            raise
        log.info("proxy route %s -> %s (%s)", route.hostname,
                 dial(route.backend_address, route.backend_port), route.backend_hostname)

    def add_routes(self, routes: Sequence[ProxyRoute]) -> None:
        """Register many routes with O(1) admin calls (e.g. into a restarted, empty Caddy).

        Caddy re-provisions its whole config on every change, so adding n routes one by
        one costs O(n^2); here absent routes go in with one append of each list
        (``/...`` expands an array). Routes partly present are replaced one by one.
        """
        if not routes:
            return
        apps = self._call("GET", "/config/apps") or {}
        self._ensure_skeleton(apps)
        have = {r.get("@id") for r in dig(apps, "http", "servers", SERVER, "routes") or []
                if isinstance(r, dict)}
        have |= {c.get("@id") for c in dig(apps, "tls", "certificates", "load_files") or []
                 if isinstance(c, dict)}
        fresh = [r for r in routes
                 if route_id(r.hostname) not in have and cert_id(r.hostname) not in have]
        for r in routes:
            if r not in fresh:
                self.add_route(r)
        if not fresh:
            return
        self._call("POST", "/config/apps/tls/certificates/load_files/...",
                   [build_cert_entry(r) for r in fresh], created_id=cert_id(fresh[0].hostname))
        try:
            self._call("POST", f"/config/apps/http/servers/{SERVER}/routes/...",
                       [build_route(r, self.backend_ca) for r in fresh],
                       created_id=route_id(fresh[0].hostname))
        except ProxyError:
            self._drop_cert_entries(fresh)
            raise
        log.info("proxy: %d routes registered in one batch", len(fresh))

    def _drop_cert_entries(self, routes: Sequence[ProxyRoute]) -> None:
        """Rollback after a failed route call: no certificate entry without its route."""
        for r in routes:
            try:
                self._delete(f"/id/{cert_id(r.hostname)}")
            except ProxyError as exc:
                log.warning("rollback of certificate entry for %s failed: %s", r.hostname, exc)

    def _delete(self, path: str) -> bool:
        """DELETE; False when there was nothing to delete (404)."""
        return self._call("DELETE", path, ok404=True) is not _MISSING

    def remove_route(self, hostname: str) -> bool:
        """Route first, then its certificate entry: never a route without a certificate."""
        found = self._delete(f"/id/{route_id(hostname)}")
        found = self._delete(f"/id/{cert_id(hostname)}") or found
        return found

    def list_routes(self) -> dict[str, ProxyRoute]:
        # One GET of the apps tree: deeper paths are a 400 on a Caddy that lacks them.
        apps = self._call("GET", "/config/apps") or {}
        routes = dig(apps, "http", "servers", SERVER, "routes") or []
        files = dig(apps, "tls", "certificates", "load_files") or []
        certs = {}
        for entry in files:
            cid = entry.get("@id", "") if isinstance(entry, dict) else ""
            if isinstance(cid, str) and cid.startswith(CERT_PREFIX):
                certs[cid[len(CERT_PREFIX):]] = entry
        out = {}
        for obj in routes:
            parsed = parse_route(obj, certs) if isinstance(obj, dict) else None
            if parsed is not None:
                out[parsed.hostname] = parsed
        return out

    def config_size(self) -> int:
        """Bytes of Caddy's whole JSON config (benchmarks)."""
        return len(json.dumps(self._call("GET", "/config/")))


def dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` of Caddy's JSON, None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def make_router(backend: str, admin_url: str, https_port: int, cert_dir: Path,
                backend_ca: str = "") -> CaddyRouter:
    if backend != "caddy":
        raise ProxyError(f"unsupported proxy backend {backend!r} (only 'caddy')")
    return CaddyRouter(admin_url, https_port, cert_dir, backend_ca=backend_ca)
