"""Edge routes (design §5): public TLS hostname on the node proxy -> Tailnet backend over TLS.

Setup runs validate -> dns -> certificate -> proxy -> persist, and undoes
what it did when a later step fails, so a failed setup leaves no route, no
certificate files and no row behind (and an update that fails leaves the
previous route serving). The registry row is the source of truth the proxy
is reconciled to: a restarted Caddy starts empty and ``reconcile`` puts the
routes back, renewing certificates that are due on the way.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from . import tailnet
from .acme import AcmeClient
from .config import AgentConfig
from .errors import (
    DNSCheckError,
    EdgeError,
    IssuerError,
    NotFoundError,
    ProxyError,
    ValidationError,
)
from .files import unlink_quietly
from .front import Front
from .proxy import ProxyRoute, Router
from .records import EdgeRouteRecord
from .registry import Registry
from .servicedef import check_hostname

log = logging.getLogger(__name__)

T = TypeVar("T")


def under_domain(name: str, domain: str) -> bool:
    """Label matching: ``x.example.net`` and ``example.net`` are under ``example.net``,
    ``evilexample.net`` is not."""
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return bool(domain) and (name == domain or name.endswith("." + domain))


def validate(config: AgentConfig, hostname: object, backend_hostname: object,
             backend_port: object, backend_tls: object = True) -> tuple[str, str, int]:
    """Every input rule, before anything is resolved, issued or written."""
    if backend_tls is not True:
        raise ValidationError("no cleartext to backends: backend_tls must be true",
                              "backend_tls")
    host = check_hostname(hostname, "hostname")
    backend = check_hostname(backend_hostname, "backend_hostname")
    if isinstance(backend_port, bool) or not isinstance(backend_port, int) \
            or not 0 < backend_port < 65536:
        raise ValidationError("must be an integer 1-65535", "backend_port")
    allowed = config.edge.allowed_domains
    if not any(under_domain(host, d) for d in allowed):
        raise ValidationError(
            f"{host} is not under an allowed domain ({', '.join(allowed) or 'none configured'})",
            "hostname")
    zone = config.edge.internal_zone
    if not under_domain(backend, zone):
        raise ValidationError(f"{backend} is not in the internal zone {zone}",
                              "backend_hostname")
    if under_domain(host, zone):
        raise ValidationError(f"{host} is inside the internal zone {zone}; "
                              "internal names are not published", "hostname")
    return host, backend, backend_port


def parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


class EdgeManager:
    """Edge routes on this node; thread-safe (one lock around every mutation)."""

    def __init__(self, config: AgentConfig, registry: Registry,
                 front: Front | None = None) -> None:
        self.config = config
        self.registry = registry
        self.front = front or Front(config)
        self.edge_dir = self.front.edge_dir
        self.router: Router = self.front.router
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}

    # -- pieces ------------------------------------------------------------------

    @property
    def issuer(self) -> AcmeClient:
        return self.front.issuer

    def _step(self, name: str, fn: Callable[[], T], host: str) -> T:
        """Run one setup step, timing it and naming it in any edge error."""
        start = time.perf_counter()
        try:
            return fn()
        except (EdgeError, DNSCheckError) as exc:
            step = name.split("_")[0]
            raise type(exc)(f"edge route {host}: {step} step failed: {exc}") from exc
        finally:
            self.last_timings[name] = time.perf_counter() - start

    def _resolve(self, backend: str) -> list[str]:
        return tailnet.resolve_tailnet(backend, self.config.dns.nameservers,
                                       self.config.dns.timeout_s)

    def _issue(self, host: str) -> tuple[Path, Path, str, str]:
        """New key + certificate, written under serial-bearing names (key 0600)."""
        cert_file, key_file, info = self.front.issue(
            host, lambda serial: (self.router.cert_path(host, serial),
                                  self.router.key_path(host, serial)))
        return cert_file, key_file, info.serial, info.expires

    def _due(self, rec: EdgeRouteRecord) -> bool:
        if not (Path(rec.cert_path).is_file() and Path(rec.key_path).is_file()):
            return True
        expires = parse_time(rec.cert_expires)
        window = timedelta(days=self.config.acme.renew_before_days)
        return expires is None or expires - datetime.now(UTC) < window

    @staticmethod
    def _proxy_route(rec: EdgeRouteRecord) -> ProxyRoute:
        return ProxyRoute(hostname=rec.hostname, backend_address=rec.backend_address,
                          backend_port=rec.backend_port, backend_hostname=rec.backend_hostname,
                          cert_file=rec.cert_path, key_file=rec.key_path)

    @staticmethod
    def view(rec: EdgeRouteRecord) -> dict[str, Any]:
        return {"hostname": rec.hostname, "backend_hostname": rec.backend_hostname,
                "backend_port": rec.backend_port, "backend_address": rec.backend_address,
                "backend_tls": rec.backend_tls, "cert_serial": rec.cert_serial,
                "cert_expires": rec.cert_expires, "created_at": rec.created_at,
                "updated_at": rec.updated_at}

    # -- operations --------------------------------------------------------------

    def setup(self, hostname: str, backend_hostname: str, backend_port: int,
              backend_tls: bool = True) -> dict[str, Any]:
        """Create or update a route; all or nothing; identical arguments change nothing."""
        t0 = time.perf_counter()
        self.last_timings = {}
        host, backend, port = validate(self.config, hostname, backend_hostname, backend_port,
                                       backend_tls)
        with self._lock:
            addresses = self._step("dns", lambda: self._resolve(backend), host)
            address = addresses[0]
            old = self.registry.get_edge_route(host)
            reuse_cert = old is not None and not self._due(old)
            if not reuse_cert:
                # Cheap reachability check first, so a down proxy costs no certificate.
                self._step("proxy_check", self.router.ping, host)
            rec = EdgeRouteRecord(
                hostname=host, backend_hostname=backend, backend_port=port,
                backend_address=address, cert_path=old.cert_path if old else "",
                key_path=old.key_path if old else "",
                cert_serial=old.cert_serial if old else "",
                cert_expires=old.cert_expires if old else "",
                created_at=old.created_at if old else "")
            new_files: tuple[Path, ...] = ()
            if not reuse_cert:
                cert_file, key_file, serial, expires = self._step(
                    "certificate", lambda: self._issue(host), host)
                new_files = (cert_file, key_file)
                rec.cert_path, rec.key_path = str(cert_file), str(key_file)
                rec.cert_serial, rec.cert_expires = serial, expires
            try:
                self._step("proxy", lambda: self.router.add_route(self._proxy_route(rec)), host)
                unchanged = old is not None and reuse_cert and _same(old, rec)
                if not unchanged:
                    start = time.perf_counter()
                    self.registry.put_edge_route(rec)
                    self.last_timings["persist"] = time.perf_counter() - start
            except BaseException:
                self._undo_proxy(old, host)
                unlink_quietly(*new_files)
                raise
            if old is not None and new_files:
                unlink_quietly(Path(old.cert_path), Path(old.key_path))
            self.last_timings["total"] = time.perf_counter() - t0
            saved = self.registry.get_edge_route(host)
            assert saved is not None
            log.info("edge route %s -> %s:%d (%s) serial %s", host, address, port, backend,
                     saved.cert_serial)
            return self.view(saved)

    def _undo_proxy(self, old: EdgeRouteRecord | None, host: str) -> None:
        """Put the proxy back as it was before a failed setup (best effort)."""
        try:
            if old is None:
                self.router.remove_route(host)
            else:
                self.router.add_route(self._proxy_route(old))
        except EdgeError as exc:
            log.warning("could not roll back proxy route %s: %s", host, exc)

    def remove(self, hostname: str) -> None:
        host = check_hostname(hostname, "hostname")
        with self._lock:
            rec = self.registry.get_edge_route(host)
            if rec is None:
                raise NotFoundError(f"unknown edge route {host!r}")
            try:
                self.router.remove_route(host)
            except ProxyError as exc:
                raise ProxyError(f"edge route {host}: proxy step failed: {exc}") from exc
            self.registry.delete_edge_route(host)
            unlink_quietly(Path(rec.cert_path), Path(rec.key_path))
            log.info("edge route %s removed", host)

    def list(self) -> list[dict[str, Any]]:
        return [self.view(r) for r in self.registry.list_edge_routes()]

    def reconcile(self) -> builtins.list[str]:
        """Renew certificates that are due and re-register routes the proxy lost."""
        actions: builtins.list[str] = []
        with self._lock:
            rows = self.registry.list_edge_routes()
            actions.extend(self._collect_orphans(rows))
            if not rows:
                return actions
            try:
                present = self.router.list_routes()
            except ProxyError as exc:
                return [f"cannot reconcile edge routes: {exc}"]
            lost: list[EdgeRouteRecord] = []
            for rec in rows:
                try:
                    if self._due(rec):
                        actions.append(self._renew(rec))
                    elif present.get(rec.hostname) != self._proxy_route(rec):
                        lost.append(rec)
                except EdgeError as exc:
                    log.warning("reconcile %s: %s", rec.hostname, exc)
                    actions.append(f"edge route {rec.hostname}: {exc}")
            actions.extend(self._reregister(lost))
        for a in actions:
            log.info("%s", a)
        return actions

    def _collect_orphans(self, rows: builtins.list[EdgeRouteRecord]) -> builtins.list[str]:
        """Certificate files no row refers to (a crash between writing and persisting)."""
        cert_dir = self.edge_dir / "certs"
        if not cert_dir.is_dir():
            return []
        # By file name: the state dir may be reached by another path than the rows record
        # (a symlink, a moved dir), and a live certificate must never count as an orphan.
        keep = {Path(p).name for r in rows for p in (r.cert_path, r.key_path)}
        out = []
        for f in sorted(cert_dir.iterdir()):
            if f.is_file() and f.suffix in (".crt", ".key") and f.name not in keep:
                unlink_quietly(f)
                out.append(f"removed orphaned certificate file {f.name}")
        return out

    def _reregister(self, lost: builtins.list[EdgeRouteRecord]) -> builtins.list[str]:
        """One batch into the proxy; if the batch fails, route by route to name the culprit."""
        if not lost:
            return []
        try:
            self.router.add_routes([self._proxy_route(r) for r in lost])
            return [f"re-registered edge route {r.hostname}" for r in lost]
        except EdgeError as exc:
            log.warning("batch re-registration failed (%s); trying one by one", exc)
        out = []
        for rec in lost:
            try:
                self.router.add_route(self._proxy_route(rec))
                out.append(f"re-registered edge route {rec.hostname}")
            except EdgeError as exc:
                out.append(f"edge route {rec.hostname}: {exc}")
        return out

    def _renew(self, rec: EdgeRouteRecord) -> str:
        cert_file, key_file, serial, expires = self._issue(rec.hostname)
        new = EdgeRouteRecord(**{**rec.__dict__, "cert_path": str(cert_file),
                                 "key_path": str(key_file), "cert_serial": serial,
                                 "cert_expires": expires})
        try:
            self.router.add_route(self._proxy_route(new))
            self.registry.put_edge_route(new)
        except BaseException:
            self._undo_proxy(rec, rec.hostname)
            unlink_quietly(cert_file, key_file)
            raise
        if rec.cert_path != str(cert_file):
            unlink_quietly(Path(rec.cert_path), Path(rec.key_path))
        return (f"renewed certificate for {rec.hostname}: serial {rec.cert_serial or '-'} -> "
                f"{serial}, expires {expires}")

    def health(self) -> builtins.list[str]:
        rows = self.registry.list_edge_routes()
        if not rows:
            return []
        reasons = []
        try:
            self.router.ping()
        except ProxyError as exc:
            reasons.append(f"edge proxy unreachable: {exc}")
        if self.config.acme.directory:
            try:
                self.issuer.ping()
            except IssuerError as exc:
                reasons.append(f"certificate issuer unreachable: {exc}")
        now = datetime.now(UTC)
        for r in rows:
            exp = parse_time(r.cert_expires)
            if exp is not None and exp <= now:
                reasons.append(f"certificate for {r.hostname} expired at {r.cert_expires}")
        return reasons

    def close(self) -> None:
        self.front.close()


def _same(a: EdgeRouteRecord, b: EdgeRouteRecord) -> bool:
    keys = ("backend_hostname", "backend_port", "backend_address", "cert_path", "key_path",
            "cert_serial", "cert_expires", "backend_tls")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


