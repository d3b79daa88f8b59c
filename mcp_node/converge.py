"""The per-component steps of the agent's operations: converge a service to its
record, undo a failed deploy, bring one component to its desired state, remove
one. The agent holds the service's lock around them and chooses which to run;
each step is noted in ``progress`` for ``mcp`` to show while it waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from .errors import WorkloadError
from .operations import STOP_TIMEOUT_S
from .readiness import check, effective
from .runtime import NEXT, OLD, side_key
from .states import RUNNING, State

if TYPE_CHECKING:
    from .netplan import NetAttach
    from .progress import Progress
    from .records import ComponentRecord, ServiceRecord
    from .registry import Registry
    from .runtime import Runtime, WorkloadSpec
    from .servicedef import ServiceDef, UpdateDef

log = logging.getLogger("mcp_node.agent")


T = TypeVar("T")

PROBE_EVERY_S = 0.05   # a start-first replace's new workload, until its check passes


def in_parallel(tasks: list[Callable[[], T]]) -> list[T]:
    """Run independent steps at once; every one finishes before the first error is
    raised, so a rollback sees the runtimes settled."""
    if len(tasks) <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(max_workers=min(8, len(tasks))) as pool:
        futures = [pool.submit(t) for t in tasks]
        wait(futures)
    return [f.result() for f in futures]


def beside_components(defn: ServiceDef, previous: ServiceRecord | None,
                      changed: tuple[str, ...], bridged: bool,
                      serve_routes: bool) -> frozenset[str]:
    """The changed components a start-first deploy replaces beside their current
    workload, of the same runtime as before (the rest are replaced stop-first).
    User mode: those with a route the node proxy serves (host ports are their only way
    in, so the proxy is what switches). On a service network (``bridged``): all of them,
    proxy or not: the new one listens on the same ports at an address of its own, and
    the switch moves the names and the host ports' rules to it (a VM's image holds no
    address: the guest takes it by DHCP, so an ``image_sha256`` pin holds at either)."""
    if defn.update.order != "start-first" or previous is None:
        return frozenset()
    old = {c.defn.name: c.defn for c in previous.components}
    same = [c for c in defn.components if c.name in changed and c.name in old
            and old[c.name].runtime == c.runtime]
    if bridged:
        return frozenset(c.name for c in same)
    return frozenset(c.name for c in same if c.routes) if serve_routes else frozenset()


class SideAddresses(Protocol):
    """A start-first replace's second address on a service network (bridge mode:
    ``servicenet.ServiceNetworks``): two workloads cannot share one."""

    def begin_side(self, service: str, key: str, vm: bool) -> NetAttach | None: ...
    def promote_side(self, service: str, component: str, nxt: str, old: str) -> None: ...
    def end_side(self, service: str, key: str) -> None: ...


class Steps:
    """The runtimes as the agent drives them, one component at a time."""

    def __init__(self, runtime: Callable[[str], Runtime],
                 spec: Callable[[str, ComponentRecord], WorkloadSpec],
                 registry: Registry, progress: Progress,
                 switch: Callable[[str, str], None], sides: SideAddresses) -> None:
        self.runtime = runtime
        self.spec = spec
        self.registry = registry
        self.progress = progress
        # Sends a component's new connections to its new workload (the node proxy's
        # ``switch``, where it serves routes).
        self.switch = switch
        self.sides = sides   # a side workload's own address (bridge mode; else none)
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic
        # (service, component) of each start-first replace in flight: its ``.next`` and
        # ``.old`` are the replace's own, not orphans, while it runs (health says so).
        self.replacing: set[tuple[str, str]] = set()

    def converge(self, rec: ServiceRecord, previous: ServiceRecord | None,
                 beside: frozenset[str] = frozenset(),
                 switched: set[str] | None = None) -> int:
        """Make the runtimes match ``rec``; an unchanged running component is left alone.

        Components are independent, so each one's steps run in parallel with the
        others'. Returns how many workloads were created or removed. A component in
        ``beside`` whose workload runs is replaced start-first (``replace_beside``);
        each one switched to its new workload is added to ``switched``.
        """
        old = {c.defn.name: c for c in previous.components} if previous else {}
        gone = [oc for name, oc in old.items()
                if name not in {c.defn.name for c in rec.components}
                or oc.defn.runtime != rec.component(name).defn.runtime]
        in_parallel([partial(self.remove, rec.name, oc) for oc in gone])

        def one(comp: ComponentRecord) -> bool:
            rt, step = self.runtime(comp.defn.runtime), partial(self.progress.step, rec.name,
                                                                comp.defn.name)
            if comp.desired_state != RUNNING:
                step("stopping")
                rt.stop(rec.name, comp.defn.name, STOP_TIMEOUT_S)
                step("stopped")
                return False
            prev = old.get(comp.defn.name)
            if prev is not None and prev.defn == comp.defn and prev.host_ports == comp.host_ports:
                live = rt.inspect(rec.name, comp.defn.name)
                if live is not None and live.state == RUNNING:
                    step("unchanged")
                    return False
            if comp.defn.name in beside:
                live = rt.inspect(rec.name, comp.defn.name)
                if live is not None and live.state == RUNNING:
                    self.replace_beside(rec, comp, switched if switched is not None else set())
                    return True
            step("starting" if prev is None else "replacing")
            rt.run(self.spec(rec.name, comp))
            step("running")
            return True

        ran = in_parallel([partial(one, c) for c in rec.components])
        return len(gone) + sum(ran)

    def replace_beside(self, rec: ServiceRecord, comp: ComponentRecord,
                       switched: set[str]) -> None:
        """Start-first: the new workload runs beside the current one (on the record's
        new host ports, while the node proxy is held on the old ones); once it passes
        its check, within ``healthy_deadline_s``, the proxy sends new connections to it,
        it becomes the component's workload, and the old one keeps its open
        connections for ``drain_s`` before it is stopped. Until the switch the old one
        is never touched: a new one that fails is removed and the error raised."""
        service, name = rec.name, comp.defn.name
        update: UpdateDef = rec.definition().update
        rt = self.runtime(comp.defn.runtime)
        self.replacing.add((service, name))
        try:
            self._beside(rt, rec, comp, update, switched)
        finally:
            self.replacing.discard((service, name))
            for slot in (NEXT, OLD):   # whatever happened, no side holds a number now
                self.sides.end_side(service, side_key(name, slot))

    def _beside(self, rt: Runtime, rec: ServiceRecord, comp: ComponentRecord,
                update: UpdateDef, switched: set[str]) -> None:
        service, name = rec.name, comp.defn.name
        step = partial(self.progress.step, service, name)
        step("starting beside the current one")
        spec = replace(self.spec(service, comp), slot=NEXT)
        net = self.sides.begin_side(service, spec.key, rt.traits.joins_by == "tap")
        try:
            rt.run(replace(spec, net=net) if net is not None else spec)
            step("checking")
            self._passing(rt, service, comp, update.healthy_deadline_s,
                          net.address if net is not None else "")
            step("switching")
            self.switch(service, name)
        except BaseException:
            self._remove_quietly(rt, service, side_key(name, NEXT))
            raise
        switched.add(name)
        # its names (and its address) are the new one's
        self.sides.promote_side(service, name, side_key(name, NEXT), side_key(name, OLD))
        rt.promote(service, name)
        log.info("start-first %s/%s: switched to the new workload; the old one drains "
                 "for %gs", service, name, update.drain_s)
        step("draining")
        self.sleep(update.drain_s)
        rt.remove(service, side_key(name, OLD))
        step("running")

    def _passing(self, rt: Runtime, service: str, comp: ComponentRecord,
                 deadline_s: float, address: str = "") -> None:
        """Until the ``NEXT`` workload passes the component's check; WorkloadError naming
        the check and its last result when it has not within ``deadline_s``. On a
        service network (``address``, its own) it is probed there, on the same ports:
        the host ports reach the current workload until the switch."""
        key, d = side_key(comp.defn.name, NEXT), comp.defn
        timeout = d.check_timeout_s

        def tcp(port: int, t: float) -> str:
            return rt.tcp_check(service, key, port, t)

        end = self.clock() + deadline_s
        while True:
            result = check(d, comp.host_ports, timeout, None, address) if address else \
                check(d, comp.host_ports, timeout, tcp)
            if result.ok:
                return
            live = rt.inspect(service, key)
            if live is None or live.state != RUNNING:
                raise WorkloadError(f"{service}/{d.name}: its new workload stopped before "
                                    f"it passed its {effective(d)} check ({result.detail}); "
                                    "the current one still serves")
            if self.clock() >= end:
                raise WorkloadError(f"{service}/{d.name}: its new workload did not pass its "
                                    f"{effective(d)} check within {deadline_s:g}s "
                                    f"(healthy_deadline_s; last: {result.detail}); the "
                                    "current one still serves")
            self.sleep(PROBE_EVERY_S)

    @staticmethod
    def _remove_quietly(rt: Runtime, service: str, key: str) -> None:
        try:
            rt.remove(service, key)
        except Exception:
            log.exception("could not remove %s/%s", service, key)

    def remove(self, service: str, comp: ComponentRecord) -> None:
        self.progress.step(service, comp.defn.name, "removing")
        self.runtime(comp.defn.runtime).remove(service, comp.defn.name)
        self.progress.step(service, comp.defn.name, "removed")

    def rollback(self, rec: ServiceRecord, previous: ServiceRecord | None,
                 beside: frozenset[str] = frozenset(), switched: set[str] | None = None,
                 ) -> None:
        """Undo a failed deploy of ``rec``: what it may have made or changed is removed
        and the previous record's workloads run again; a component the deploy left as
        it was (same definition, ports and desired state, or a start-first replace that
        never switched: ``beside`` less ``switched``) is not touched."""
        log.warning("deploy of %s failed; rolling back", rec.name)
        old = {c.defn.name: c for c in previous.components} if previous else {}

        def untouched(comp: ComponentRecord) -> bool:
            prev = old.get(comp.defn.name)
            if prev is not None and comp.defn.name in beside - (switched or set()):
                return True   # its new workload (if any) is removed already
            return prev is not None and prev.defn == comp.defn and \
                prev.host_ports == comp.host_ports and prev.desired_state == comp.desired_state

        kept = {c.defn.name for c in rec.components if untouched(c)}
        for comp in rec.components:
            if comp.defn.name in kept:
                continue
            self.progress.step(rec.name, comp.defn.name, "rolling back")
            rt = self.runtime(comp.defn.runtime)
            keys = [comp.defn.name] + ([side_key(comp.defn.name, s) for s in (NEXT, OLD)]
                                       if comp.defn.name in beside else [])
            for key in keys:
                self._remove_quietly(rt, rec.name, key)
        if previous is None:
            self.registry.delete_service(rec.name)
            return
        ports = {(c.defn.name, r): p for c in previous.components for r, p in c.host_ports.items()}
        desired = {c.defn.name: c.desired_state for c in previous.components}
        restored = self.registry.put_service(previous.definition(), ports=ports,
                                             desired=desired)
        for comp in restored.components:
            if comp.desired_state != RUNNING:
                continue
            rt = self.runtime(comp.defn.runtime)
            try:
                live = rt.inspect(rec.name, comp.defn.name) if comp.defn.name in kept else None
                if live is None or live.state != RUNNING:
                    rt.run(self.spec(rec.name, comp))
            except Exception:
                log.exception("rollback: could not restart %s/%s", rec.name, comp.defn.name)

    def to_state(self, service: str, comp: ComponentRecord, desired: State,
                 restart: bool, timeout: float = STOP_TIMEOUT_S) -> None:
        """One component to its desired state. A stopped workload made from the same
        spec is started as it is, so its log survives a stop/start."""
        rt, step = self.runtime(comp.defn.runtime), partial(self.progress.step, service,
                                                            comp.defn.name)
        if desired != RUNNING or restart:
            step("stopping")
            rt.stop(service, comp.defn.name, timeout)
            step("stopped")
            if desired != RUNNING:
                return
        spec = self.spec(service, comp)
        live = rt.inspect(service, comp.defn.name)
        if live is None or live.state != RUNNING:
            step("starting")
            if live is None or live.spec_digest != spec.digest or \
                    not rt.start(service, comp.defn.name):
                rt.run(spec)
        step("running")
