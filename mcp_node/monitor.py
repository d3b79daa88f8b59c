"""The observed-state view: one listing per runtime, compared with the registry.

``ps``, ``status`` and health read the cached ``View``; only ``refresh``
talks to the runtimes, and it makes exactly one ``list()`` call per runtime
whatever the number of components. State changes go to the event log, from
which drift and flapping are judged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import MonitorConfig
from .errors import MCPError, NotFoundError, RegistryError
from .records import ComponentRecord, Event, ServiceRecord
from .registry import Registry
from .runtime import Runtime, Workload
from .states import MISSING, RUNNING, UNKNOWN

log = logging.getLogger("mcp_node.monitor")

Key = tuple[str, str]


@dataclass
class View:
    workloads: dict[Key, Workload] = field(default_factory=dict)
    orphans: list[Workload] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)   # runtime -> why it could not list
    flapping: set[Key] = field(default_factory=set)
    drifted: list[Key] = field(default_factory=list)
    records: list[ServiceRecord] = field(default_factory=list)  # the registry as compared
    refreshed_at: float = 0.0
    _by_name: dict[str, ServiceRecord] | None = field(default=None, repr=False, compare=False)

    def record(self, name: str) -> ServiceRecord | None:
        """The service as this view compared it: what each in-progress rollout reads
        every round, so a dict built once per view, not a registry read per rollout."""
        if self._by_name is None:
            self._by_name = {r.name: r for r in self.records}
        return self._by_name.get(name)


def is_drift(desired: str, observed: str) -> bool:
    """Desired running but not running, or desired stopped but running."""
    if observed == UNKNOWN:
        return False
    return (desired == RUNNING) != (observed == RUNNING)


def observe(
    records: Iterable[ServiceRecord],
    listings: dict[str, list[Workload]],
    errors: dict[str, str],
    restarts: dict[Key, int],
    now: float,
    digest: Callable[[ServiceRecord, ComponentRecord], str] | None = None,
) -> tuple[dict[Key, Workload], list[Workload], list[Event]]:
    """Pure comparison of registry and listings: (by key, orphans, events).

    An event is ``unplanned`` (counted toward flapping) only when the workload itself
    left the desired state: it exited (stopped) while made from the spec it should run
    (``digest``). A container gone (missing) or stopped while of an older spec is the
    agent's own doing, such as a redeploy an agent crash cut, which reconcile repairs."""
    by_key: dict[Key, Workload] = {}
    for workloads in listings.values():
        for item in workloads:
            by_key[(item.service, item.component)] = item
    known: set[Key] = set()
    events: list[Event] = []
    for rec in records:
        for comp in rec.components:
            key = (rec.name, comp.defn.name)
            known.add(key)
            if comp.defn.runtime in errors:
                continue  # cannot tell; do not invent a change
            w: Workload | None = by_key.get(key)
            if w is not None and w.runtime != comp.defn.runtime:
                w = None
            state = w.state if w else MISSING
            if state != comp.observed_state:
                # Reaching the desired state (a deploy, an operator's stop/start) is planned;
                # leaving it is what a flapping workload does.
                crashed = is_drift(comp.desired_state, state) and state != MISSING and not (
                    digest is not None and w is not None and w.spec_digest
                    and w.spec_digest != _digest(digest, rec, comp, w.spec_digest))
                events.append(Event(rec.name, comp.defn.name, now, comp.observed_state, state,
                                    unplanned=crashed))
            if w is not None:
                before = restarts.get(key)
                if before is not None and w.restart_count > before:
                    events.append(Event(rec.name, comp.defn.name, now, state, state,
                                        f"restarted by runtime ({w.restart_count})"))
                restarts[key] = w.restart_count
    orphans = [w for k, w in by_key.items() if k not in known]
    return {k: w for k, w in by_key.items() if k in known}, orphans, events


def drifted_of(records: Iterable[ServiceRecord], workloads: dict[Key, Workload],
               errors: dict[str, str]) -> list[Key]:
    return [
        (rec.name, c.defn.name) for rec in records for c in rec.components
        if c.defn.runtime not in errors and is_drift(
            c.desired_state, workloads[(rec.name, c.defn.name)].state
            if (rec.name, c.defn.name) in workloads else MISSING)
    ]


def _digest(digest: Callable[[ServiceRecord, ComponentRecord], str], rec: ServiceRecord,
            comp: ComponentRecord, have: str) -> str:
    """The spec digest the component should run; ``have`` (so: a crash) if it cannot be
    computed: a round must not fail over it."""
    try:
        return digest(rec, comp)
    except Exception:   # noqa: BLE001 - the round goes on; the event counts
        log.exception("monitor: no spec digest for %s/%s", rec.name, comp.defn.name)
        return have


class Monitor:
    """Keeps the View fresh: on a timer (daemon) or on demand (``--local``)."""

    def __init__(
        self,
        registry: Registry,
        runtimes: Callable[[], dict[str, Runtime | str]],
        config: MonitorConfig,
        on_refresh: Callable[[View], None] | None = None,
    ) -> None:
        self.registry = registry
        self._runtimes = runtimes
        self.config = config
        self.view = View()
        self._restarts: dict[Key, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last_error = ""          # why the last refresh failed ("" if it did not)
        # Whole rounds run and the CPU their thread spent in them (with what the round's
        # subscribers do): what a round costs, apart from the checker's probes (metrics).
        self.rounds = 0
        self.round_cpu_s = 0.0
        # Of it, the runtimes' listings (podman's answer read and parsed): the share that
        # grows with the workloads whatever the agent does, counted in the same rounds.
        self.listing_cpu_s = 0.0
        self._thread: threading.Thread | None = None
        self._on_refresh = on_refresh
        # The spec a component should run (the reconciler's): set by the agent.
        self.digest: Callable[[ServiceRecord, ComponentRecord], str] | None = None
        # Service -> the time after which its flaps count (a rollout judged it healthy).
        self.calm_since: Callable[[], dict[str, float]] = dict

    def refresh(self) -> View:
        with self._lock:
            cpu = time.thread_time()
            listings, errors = self._listings()
            self.listing_cpu_s += time.thread_time() - cpu
            now = time.time()
            records = self.registry.list_services()
            workloads, orphans, events = observe(records, listings, errors, self._restarts, now,
                                                 self.digest)
            known = {(r.name, c.defn.name) for r in records for c in r.components}
            for key in [k for k in self._restarts if k not in known]:   # undeployed
                del self._restarts[key]
            unwritten, flapping = self._record(events, now, self.view.flapping)
            self.view = View(workloads, orphans, errors, flapping,
                             drifted_of(records, workloads, errors), records, now)
        if self._on_refresh:
            self._on_refresh(self.view)
        if unwritten is not None:
            raise unwritten
        return self.view

    def refresh_service(self, service: str) -> View:
        """After an operation on one service: each runtime lists that service's
        workloads alone and the view is updated for it, so what a deploy costs does not
        grow with the node's other services. No round runs (reconcile, health, the
        subscribers: the next one does, within the interval)."""
        with self._lock:
            try:
                mine = [self.registry.get_service(service)]
            except NotFoundError:
                mine = []
            old = self.view
            listings, errors = self._listings(service)
            now = time.time()
            workloads, orphans, events = observe(mine, listings, errors, self._restarts,
                                                 now, self.digest)
            for key in [k for k in self._restarts if k[0] == service and k not in workloads]:
                del self._restarts[key]
            unwritten, flapping = self._record(events, now, old.flapping, service)
            self.view = View(
                {**{k: w for k, w in old.workloads.items() if k[0] != service}, **workloads},
                [w for w in old.orphans if w.service != service] + orphans, errors,
                {k for k in old.flapping if k[0] != service} |
                {k for k in flapping if k[0] == service},
                [k for k in old.drifted if k[0] != service] +
                drifted_of(mine, workloads, errors),
                [r for r in old.records if r.name != service] + mine, old.refreshed_at)
        if unwritten is not None:
            raise unwritten
        return self.view

    def _listings(self, service: str | None = None) -> tuple[dict[str, list[Workload]],
                                                             dict[str, str]]:
        """Each runtime's listing (of ``service`` alone), and why a runtime had none."""
        listings: dict[str, list[Workload]] = {}
        errors: dict[str, str] = {}
        for name, rt in self._runtimes().items():
            if isinstance(rt, str):
                errors[name] = rt
                continue
            try:
                listings[name] = rt.list(service)
            except MCPError as exc:
                errors[name] = str(exc)
        return listings, errors

    def _record(self, events: list[Event], now: float, before: set[Key],
                service: str | None = None) -> tuple[RegistryError | None, set[Key]]:
        """Store ``events``; the components flapping now (of ``service`` alone, if
        given). The view shows what was observed even when the registry cannot store it
        (full disk, read-only): it must never go on claiming an older state. The error
        is raised after the view is in place; the next round records the change again."""
        try:
            self.registry.record_observed(events)
            since = now - self.config.flap_window_s
            counts = self.registry.event_counts(since, service)
            for name, calm in self.calm_since().items():
                if calm > since and any(k[0] == name for k in counts):
                    after = self.registry.event_counts(calm, name)
                    counts.update({k: after.get(k, 0) for k in counts if k[0] == name})
            flapping = {k for k, n in counts.items() if n > self.config.flap_changes}
        except RegistryError as exc:
            return exc, before
        for e in events:
            log.info("state service=%s component=%s %s->%s %s", e.service, e.component,
                     e.prev_state, e.new_state, e.detail)
        return None, flapping

    @property
    def running(self) -> bool:
        return self._thread is not None

    def fresh_view(self, max_age: float | None = None) -> View:
        """The cached view, refreshed first only when nobody keeps it fresh."""
        age = time.time() - self.view.refreshed_at
        if not self.running and age > (max_age if max_age is not None else 0.5):
            return self.refresh()
        return self.view

    def start(self) -> None:
        if self._thread is not None:
            return
        self.refresh_safely()
        self._thread = threading.Thread(target=self._loop, name="mcp-monitor", daemon=True)
        self._thread.start()

    def refresh_safely(self, service: str | None = None) -> None:
        """A round (or, after an operation on ``service``, that service's refresh) that
        never raises: the loop must survive anything; the next round retries."""
        cpu = time.thread_time()
        try:
            if service is None:
                self.refresh()
                self.last_error = ""
            else:
                self.refresh_service(service)
        except Exception as exc:
            self.last_error = str(exc) or type(exc).__name__
            log.exception("monitor refresh failed")
        if service is None:
            self.rounds += 1
            self.round_cpu_s += time.thread_time() - cpu

    def poke(self) -> None:
        """Run the next round now (after reconcile acted), not an interval later."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.refresh_safely()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
