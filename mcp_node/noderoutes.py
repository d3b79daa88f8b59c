"""Component routes on the node proxy (issue 11): TLS by hostname, TCP pass-through, DNS.

Every route of a deployed component is served on the node's advertised
address at its ``port``: ``l7`` by Caddy (TLS with a certificate for the
hostname from the platform CA, proxied to ``127.0.0.1:<host port>``; see
nodeproxy), ``l4`` by HAProxy (TCP passed through; see l4proxy). Each
hostname is published by RFC 2136 (dnsupdate) for the advertised address.

``sync`` drives the proxies, certificates and records to the registry, as the
reconciler drives the runtimes: per hostname DNS, then certificate (HTTP-01
needs the name to resolve to us), then the proxies. What one sync made for a
hostname is undone when a later step for it fails, so a failure leaves no
record, certificate file or proxy entry behind; the route is left pending
with its step and reason (status, health), and reconcile retries it with
backoff. Stopped components leave the proxies; undeployed ones lose their
records and certificates too. Nodes with ``proxy.serve_routes`` off keep
components on their 127.0.0.1 host ports only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from . import dnsupdate, nodeproxy
from .config import AgentConfig
from .edge import parse_time
from .errors import ConflictError, MCPError, RouteError, ValidationError
from .files import unlink_quietly
from .front import Front
from .l4proxy import HAProxy, L4Route
from .proxy import CaddyRouter
from .records import HostRecord, ServiceRecord
from .registry import Registry
from .servicedef import ServiceDef, check_route_zone
from .states import RUNNING

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str, str]   # service, component, route name
BACKOFF_MAX_S = 300.0


class _StepError(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class Want:
    service: str
    component: str
    route: str
    port: int
    mode: str
    hostname: str
    host_port: int
    running: bool

    @property
    def key(self) -> Key:
        return (self.service, self.component, self.route)

    @property
    def label(self) -> str:
        return f"{self.service}/{self.component}/{self.route or '-'} ({self.hostname}:{self.port})"


@dataclass
class Failure:
    step: str
    message: str
    attempts: int = 1
    next_try: float = 0.0


def effective_hostname(hostname: str, service: str, zone: str) -> str:
    return (hostname or f"{service}.{zone}").lower().rstrip(".")


class NodeRoutes:
    """The node proxy's component routes; thread-safe (one lock around ``sync``)."""

    def __init__(self, config: AgentConfig, registry: Registry, holder: str,
                 clock: Callable[[], float] = time.monotonic, front: Front | None = None) -> None:
        self.config = config
        self.registry = registry
        self.front = front or Front(config)
        self.address = config.node.advertise
        self.zone = config.edge.internal_zone.lower().rstrip(".")
        self.dir = config.state_dir.absolute() / "routes"
        self.caddy: CaddyRouter = self.front.router
        self.l4 = HAProxy(config.proxy.l4_binary, self.dir / "l4")
        self.dns = dnsupdate.from_config(config.dns, self.zone, holder)
        self.clock = clock
        self.failures: dict[Key, Failure] = {}
        self.served: set[Key] = set()
        self.stale_dns: dict[str, str] = {}   # hostname -> why its records could not go
        self.timings: dict[str, float] = {}
        self._caddy_known_empty = False
        self._proxy_next = 0.0
        self._lock = threading.RLock()
        # (service, component) -> route -> the host port its routes stay on while a
        # start-first replace runs the new workload beside the old one (``hold``).
        self._held: dict[tuple[str, str], dict[str, int]] = {}

    def hold(self, service: str, component: str, ports: dict[str, int]) -> None:
        """Keep the component's routes on ``ports`` (its current workload) whatever the
        registry says, until ``switch``. In memory only: after a crash the proxy follows
        the registry, where reconcile puts the new workload."""
        with self._lock:
            self._held[(service, component)] = dict(ports)

    def switch(self, service: str, component: str) -> None:
        """Send the component's new connections where the registry says (its new
        workload): the hold goes and the proxies are synced. If a route of the
        component cannot be switched, the hold is put back (the proxies follow it) and
        RouteError names the step."""
        with self._lock:
            held = self._held.pop((service, component), None)
            failures = self.sync()
            mine = [f"route {'/'.join(k)}: {f.step} step failed: {f.message}"
                    for k, f in failures.items() if k[:2] == (service, component)]
            if mine:
                if held is not None:
                    self._held[(service, component)] = held
                    self.sync()
                raise RouteError(f"service {service}: cannot switch {component} to its new "
                                 "workload: " + "; ".join(mine))

    def release(self, service: str, component: str) -> None:
        """Drop a hold without syncing (the replace failed; the record is put back)."""
        with self._lock:
            self._held.pop((service, component), None)

    # -- rules (before anything changes) -------------------------------------------

    def check(self, defn: ServiceDef) -> None:
        """Zone, low ports, l4 availability and port/hostname clashes; 400 or 409 naming
        the field, nothing changed."""
        claims: dict[int, list[tuple[str, str, str]]] = {}   # port -> (mode, host, owner)
        for svc in self.registry.list_services():
            if svc.name != defn.name:
                for w in self._wants_of(svc):
                    claims.setdefault(w.port, []).append((w.mode, w.hostname,
                                                          f"service {w.service!r}"))
        reserved = {self.config.acme.http01_port: "acme.http01_port"}
        if self.registry.list_edge_routes():
            reserved[self.config.proxy.https_port] = "proxy.https_port (edge routes)"
        check_route_zone(defn, self.zone)
        for i, c in enumerate(defn.components):
            for j, r in enumerate(c.routes):
                where = f"components[{i}].routes[{j}]."
                host = effective_hostname(r.hostname, defn.name, self.zone)
                if r.port < 1024 and r.port not in self.config.proxy.low_ports:
                    raise ValidationError(f"port {r.port} is below 1024 and not allowed on "
                                          "this node (proxy.low_ports)", where + "port")
                if r.port in reserved:
                    raise ValidationError(f"port {r.port} is the node's "
                                          f"{reserved[r.port]}", where + "port")
                if r.mode == "l4" and not self.config.proxy.l4:
                    raise ValidationError("l4 routes are off on this node (proxy.l4 is "
                                          "empty)", where + "mode")
                for mode, other_host, owner in claims.get(r.port, []):
                    if "l4" in (mode, r.mode) or other_host == host:
                        clash = ConflictError if owner.startswith("service") else \
                            ValidationError
                        raise clash(f"port {r.port} ({r.mode}, {host}) clashes with "
                                    f"{owner}'s {mode} route {other_host}:{r.port}"
                                    f"{'' if mode == r.mode == 'l7' else ' (l4 owns its port)'}",
                                    where + "port")
                claims.setdefault(r.port, []).append((r.mode, host, f"{where}port"))

    # -- desired state -----------------------------------------------------------------

    def _wants_of(self, svc: ServiceRecord) -> list[Want]:
        held = self._held
        return [Want(svc.name, c.defn.name, r.name, r.port, r.mode,
                     effective_hostname(r.hostname, svc.name, self.zone),
                     held.get((svc.name, c.defn.name), {}).get(r.name)
                     or c.host_ports.get(r.name, 0),
                     c.desired_state == RUNNING)
                for c in svc.components for r in c.defn.routes]

    def wanted(self) -> list[Want]:
        return [w for svc in self.registry.list_services() for w in self._wants_of(svc)]

    def _due(self, h: HostRecord) -> bool:
        if not (h.cert_path and Path(h.cert_path).is_file() and Path(h.key_path).is_file()):
            return True
        expires = parse_time(h.cert_expires)
        window = timedelta(days=self.config.acme.renew_before_days)
        return expires is None or expires - datetime.now(UTC) < window

    def _waiting(self, keys: list[Key], now: float) -> bool:
        fails = [self.failures.get(k) for k in keys]
        return bool(keys) and all(f is not None and f.next_try > now for f in fails)

    def _step(self, step: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        except (MCPError, OSError) as exc:
            raise _StepError(step, str(exc)) from exc
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - start

    # -- the sync ------------------------------------------------------------------------

    def sync(self, *, reconcile: bool = False, reassert: bool = False) -> dict[Key, Failure]:
        """Drive DNS, certificates and both proxies to the registry; returns the failures.

        ``reconcile`` honours each failed route's backoff; ``reassert`` sends every DNS
        registration again (a server that lost them gets them back).
        """
        with self._lock:
            self.timings = {}
            now = self.clock()
            wants = self.wanted()
            rows = self.registry.node_hosts()
            by_host: dict[str, list[Want]] = {}
            for w in wants:
                by_host.setdefault(w.hostname, []).append(w)
            host_fail: dict[str, _StepError] = {}
            undo: dict[str, Callable[[], None]] = {}
            retired: dict[str, list[Path]] = {}   # renewed: old files, dropped once served
            pinged = False
            for host, ws in sorted(by_host.items()):
                if reconcile and self._waiting([w.key for w in ws], now):
                    host_fail[host] = _StepError("", "")   # keep its failure as it is
                    continue
                needs_cert = any(w.mode == "l7" for w in ws)
                rec = rows.get(host) or HostRecord(host)
                due = needs_cert and self._due(rec)
                if due and not pinged and any(w.running for w in ws if w.mode == "l7"):
                    try:   # a down proxy costs no certificate and no record
                        self._step("proxy", self.caddy.ping)
                        pinged = True
                    except _StepError as exc:
                        host_fail[host] = exc
                        continue
                try:
                    new, undo_one = self._host(rec, due, reassert)
                except _StepError as exc:
                    host_fail[host] = exc
                    continue
                rows[host] = new
                if undo_one is not None:
                    undo[host] = undo_one
                if rec.cert_path and rec.cert_path != new.cert_path:
                    retired[host] = [Path(rec.cert_path), Path(rec.key_path)]
            live = [w for w in wants if w.running and w.hostname not in host_fail]
            proxy_fail = self._proxies(live, rows, wants, reconcile, now)
            for host in {w.hostname for w in live if w.key in proxy_fail} & set(undo):
                undo.pop(host)()   # the row, records and files back to what they were
                retired.pop(host, None)
            unlink_quietly(*(p for files in retired.values() for p in files))
            self._collect(set(by_host))
            self._record(wants, host_fail, proxy_fail, now)
            return dict(self.failures)

    def _host(self, rec: HostRecord, due: bool,
              reassert: bool) -> tuple[HostRecord, Callable[[], None] | None]:
        """DNS then certificate for one hostname; the row saved; how to undo what was made."""
        new = replace(rec)
        made_dns = False
        files: tuple[Path, Path] | None = None
        if self.dns is not None and (rec.dns_address != self.address or reassert):
            dns = self.dns
            self._step("dns", lambda: dns.register(rec.hostname, self.address))
            made_dns = rec.dns_address != self.address
            new.dns_address = self.address
        try:
            if due:
                cert, key, info = self._step("certificate", lambda: self._issue(rec.hostname))
                files = (cert, key)
                new.cert_path, new.key_path = str(cert), str(key)
                new.cert_serial, new.cert_expires = info.serial, info.expires
            if new != rec:
                self._step("persist", lambda: self.registry.put_node_host(new))
        except _StepError:
            self._undo(rec, made_dns, files, restore_row=False)
            raise

        def undo() -> None:
            self._undo(rec, made_dns, files, restore_row=True)

        return new, (undo if (made_dns or files) else None)

    def _undo(self, rec: HostRecord, made_dns: bool, files: tuple[Path, Path] | None,
              restore_row: bool) -> None:
        """Take back what one sync made for a hostname (best effort, each logged)."""
        if made_dns and self.dns is not None:
            try:
                self.dns.unregister(rec.hostname, self.address)
            except MCPError as exc:
                log.warning("undo: DNS record of %s stays: %s", rec.hostname, exc)
                self.stale_dns[rec.hostname] = str(exc)
        if files:
            unlink_quietly(*files)
        if restore_row:
            try:
                if rec.cert_path or rec.dns_address:
                    self.registry.put_node_host(rec)
                else:
                    self.registry.delete_node_host(rec.hostname)
            except MCPError as exc:
                log.warning("undo: row of %s: %s", rec.hostname, exc)

    def _issue(self, host: str) -> Any:
        certs = self.dir / "certs"
        return self.front.issue(
            host, lambda serial: (certs / f"{host}.{serial}.crt", certs / f"{host}.{serial}.key"),
            self.address)

    def _proxies(self, live: list[Want], rows: dict[str, HostRecord], wants: list[Want],
                 reconcile: bool, now: float) -> dict[Key, _StepError]:
        """Caddy to the live l7 routes, HAProxy to the live l4 ones; failures per route."""
        out: dict[Key, _StepError] = {}
        l7 = [w for w in live if w.mode == "l7" and rows.get(w.hostname, HostRecord(""))
              .cert_path]
        l4 = [w for w in live if w.mode == "l4"]
        if reconcile and now < self._proxy_next:
            return {w.key: _StepError("", "") for w in live if w.key not in self.served}
        if l7 or not self._caddy_known_empty:
            routes = [nodeproxy.L7Route(w.port, w.hostname, w.host_port) for w in l7]
            certs = {w.hostname: (rows[w.hostname].cert_path, rows[w.hostname].key_path)
                     for w in l7}
            try:
                self._step("proxy", lambda: self._caddy_apply(routes, certs))
                self._caddy_known_empty = not l7
            except _StepError as exc:
                if l7:
                    out.update({w.key: exc for w in l7})
                else:
                    log.info("node proxy: cannot check Caddy for leftovers: %s", exc)
        try:
            self._step("proxy", lambda: self.l4.apply(
                [L4Route(w.port, self.address, w.host_port, w.label) for w in l4]))
        except _StepError as exc:
            out.update({w.key: exc for w in l4})
        self._proxy_next = now + 5.0 if out else 0.0
        served = {w.key for w in l7 + l4 if w.key not in out}
        self.served = served
        return out

    def _caddy_apply(self, routes: list[nodeproxy.L7Route],
                     certs: dict[str, tuple[str, str]]) -> None:
        apps = self.caddy.call("GET", "/config/apps")
        for method, path, body in nodeproxy.plan(apps, self.address, routes, certs):
            self.caddy.call(method, path, body, ok404=method == "DELETE")
            log.info("node proxy: caddy %s %s", method, path)

    def _collect(self, wanted_hosts: set[str]) -> None:
        """Hostnames no route uses any more: records, certificate files and rows go."""
        for host, rec in self.registry.node_hosts().items():
            if host in wanted_hosts:
                continue
            if rec.dns_address and self.dns is not None:
                try:
                    self.dns.unregister(host, rec.dns_address)
                except MCPError as exc:
                    self.stale_dns[host] = str(exc)
                    self.registry.put_node_host(replace(rec, cert_path="", key_path=""))
                    unlink_quietly(*(Path(p) for p in (rec.cert_path, rec.key_path) if p))
                    continue
            unlink_quietly(*(Path(p) for p in (rec.cert_path, rec.key_path) if p))
            self.registry.delete_node_host(host)
            self.stale_dns.pop(host, None)
            log.info("node route hostname %s released", host)

    def _record(self, wants: list[Want], host_fail: dict[str, _StepError],
                proxy_fail: dict[Key, _StepError], now: float) -> None:
        keep: dict[Key, Failure] = {}
        for w in wants:
            err = host_fail.get(w.hostname) or proxy_fail.get(w.key)
            if err is None:
                continue
            old = self.failures.get(w.key)
            if not err.step:   # skipped while waiting: unchanged
                if old is not None:
                    keep[w.key] = old
                continue
            attempts = old.attempts + 1 if old else 1
            keep[w.key] = Failure(err.step, str(err), attempts,
                                  now + min(2.0 ** attempts, BACKOFF_MAX_S))
            log.warning("route %s: %s step failed: %s", w.label, err.step, err)
        self.failures = keep

    # -- what the agent calls ----------------------------------------------------------

    def after_change(self, service: str) -> None:
        """After a deploy/stop/start/undeploy: sync, and raise RouteError naming the step
        of each route of ``service`` that could not be set up."""
        failures = self.sync()
        mine = [(k, f) for k, f in failures.items() if k[0] == service]
        if mine:
            wants = {w.key: w for w in self.wanted()}
            parts = [f"route {wants[k].label if k in wants else '/'.join(k)}: {f.step} step "
                     f"failed: {f.message}" for k, f in mine]
            raise RouteError(f"service {service}: its components run, but " + "; ".join(parts)
                             + " (reconcile retries with backoff)")

    def reconcile(self, reassert: bool = False) -> None:
        try:
            self.sync(reconcile=True, reassert=reassert)
        except MCPError as exc:   # the registry itself: the monitor reports that
            log.warning("node routes: %s", exc)

    def describe(self, service: str, component: str,
                 routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Status rows of one component's routes, with URL, certificate, DNS and proxy."""
        rows = self.registry.node_hosts()
        out = []
        for r in routes:
            host = effective_hostname(r.get("hostname") or "", service, self.zone)
            key = (service, component, r["name"])
            h = rows.get(host, HostRecord(host))
            fail = self.failures.get(key)
            scheme = "https" if r["mode"] == "l7" else "tcp"
            out.append({
                **r, "hostname": host, "url": f"{scheme}://{host}:{r['port']}/"
                if scheme == "https" else f"tcp://{host}:{r['port']}",
                "address": self.address,
                "cert_serial": h.cert_serial if r["mode"] == "l7" else None,
                "cert_expires": h.cert_expires if r["mode"] == "l7" else None,
                "dns": ("off" if self.dns is None else
                        f"registered {h.dns_address}" if h.dns_address else "pending"),
                "proxy": "serving" if key in self.served else (
                    f"failed: {fail.step}" if fail else "not served"),
                "error": f"{fail.step} step failed: {fail.message}" if fail else None,
            })
        return out

    def health(self) -> list[str]:
        now = self.clock()
        wants = {w.key: w for w in self.wanted()}
        out = [f"route {wants[k].label if k in wants else '/'.join(k)}: {f.step} step failed: "
               f"{f.message} (attempt {f.attempts}, next in {max(0, f.next_try - now):.0f} s)"
               for k, f in sorted(self.failures.items())]
        out += [f"DNS records of released hostname {h} could not be removed: {why}"
                for h, why in sorted(self.stale_dns.items())]
        return out


