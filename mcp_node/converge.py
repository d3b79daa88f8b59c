"""The per-component steps of the agent's operations: converge a service to its
record, undo a failed deploy, bring one component to its desired state, remove
one. The agent holds the service's lock around them and chooses which to run;
each step is noted in ``progress`` for ``mcp`` to show while it waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from .operations import STOP_TIMEOUT_S
from .states import RUNNING, State

if TYPE_CHECKING:
    from .progress import Progress
    from .records import ComponentRecord, ServiceRecord
    from .registry import Registry
    from .runtime import Runtime, WorkloadSpec

log = logging.getLogger("mcp_node.agent")


T = TypeVar("T")


def in_parallel(tasks: list[Callable[[], T]]) -> list[T]:
    """Run independent steps at once; every one finishes before the first error is
    raised, so a rollback sees the runtimes settled."""
    if len(tasks) <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(max_workers=min(8, len(tasks))) as pool:
        futures = [pool.submit(t) for t in tasks]
        wait(futures)
    return [f.result() for f in futures]


class Steps:
    """The runtimes as the agent drives them, one component at a time."""

    def __init__(self, runtime: Callable[[str], Runtime],
                 spec: Callable[[str, ComponentRecord], WorkloadSpec],
                 registry: Registry, progress: Progress) -> None:
        self.runtime = runtime
        self.spec = spec
        self.registry = registry
        self.progress = progress

    def converge(self, rec: ServiceRecord, previous: ServiceRecord | None) -> int:
        """Make the runtimes match ``rec``; an unchanged running component is left alone.

        Components are independent, so each one's steps run in parallel with the
        others'. Returns how many workloads were created or removed.
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
            step("starting" if prev is None else "replacing")
            rt.run(self.spec(rec.name, comp))
            step("running")
            return True

        ran = in_parallel([partial(one, c) for c in rec.components])
        return len(gone) + sum(ran)

    def remove(self, service: str, comp: ComponentRecord) -> None:
        self.progress.step(service, comp.defn.name, "removing")
        self.runtime(comp.defn.runtime).remove(service, comp.defn.name)
        self.progress.step(service, comp.defn.name, "removed")

    def rollback(self, rec: ServiceRecord, previous: ServiceRecord | None) -> None:
        """Undo a failed deploy of ``rec``: what it may have made or changed is removed
        and the previous record's workloads run again; a component the deploy left as
        it was (same definition, ports and desired state) is not touched."""
        log.warning("deploy of %s failed; rolling back", rec.name)
        old = {c.defn.name: c for c in previous.components} if previous else {}

        def untouched(comp: ComponentRecord) -> bool:
            prev = old.get(comp.defn.name)
            return prev is not None and prev.defn == comp.defn and \
                prev.host_ports == comp.host_ports and prev.desired_state == comp.desired_state

        kept = {c.defn.name for c in rec.components if untouched(c)}
        for comp in rec.components:
            if comp.defn.name in kept:
                continue
            self.progress.step(rec.name, comp.defn.name, "rolling back")
            try:
                self.runtime(comp.defn.runtime).remove(rec.name, comp.defn.name)
            except Exception:
                log.exception("rollback: could not remove %s/%s", rec.name, comp.defn.name)
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
