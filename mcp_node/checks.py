"""The agent's checker: every running component probed with its check while it runs.

A check read once per run (as ``ps`` did) left a hung process ``ready`` for ever; so
the agent owns a thread (``mcp-checks``) that, from the monitor's last view, probes
each running component with its effective check (``readiness``): on every tick
(``TICK_S``) until it passes once this run, then every ``check_interval_s`` (0: never
again this run), each probe bounded by ``check_timeout_s``. A new run (another
workload id or start time) starts over.

Failures count only once a run has passed (a slow start is ``starting``, not
``unhealthy``). After ``check_failures`` in a row the component is ``unhealthy``: an
event, and with a ``restart`` policy other than ``no`` the reconciler restarts it on
the next monitor round (``unhealthy()`` is its input), counted like any restart.
Without the daemon (``mcp --local``) the views tick once per read instead, and nothing
is recorded or restarted. ``result`` and ``healthy_for`` are the read API (rollouts).
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from .errors import MCPError
from .readiness import Result, check, connect_all, effective, ports_of
from .reconcile import Run, wants_restart
from .records import ComponentRecord, Event
from .states import RUNNING

if TYPE_CHECKING:
    from .monitor import Monitor, View
    from .registry import Registry
    from .runtime import Runtime

log = logging.getLogger("mcp_node.checks")

TICK_S = 0.25
PARALLEL = 8   # probes at once
# A read's own probe of a run never probed (a status just after a deploy) is held to
# this: a deploy's answer must not wait a check's timeout (a booting VM's tcp check
# takes up to 0.5 s); if it does not pass by then the run shows starting until a tick.
READ_PROBE_S = 0.2

Key = tuple[str, str]


@dataclass
class CheckState:
    """What the checker knows of one component's current (or last) run."""

    run: Run
    check: str = ""                   # the effective check: tcp | http:/path | none
    ok: bool | None = None            # the last result; None before the first probe
    time: float | None = None         # of the last result (unix)
    detail: str = ""                  # of the last result: "accepted", "HTTP 503" ...
    failures: int = 0                 # in a row, counted once the run has passed
    passed: bool = False              # passed once this run
    healthy_since: float | None = None  # start of the current passing streak (unix)
    # What the last pass vouches for: until the next probe is due (a probe that hangs
    # must not go on counting as healthy time); for ever when checked once per run.
    vouched_until: float = math.inf
    unhealthy: bool = False           # failed check_failures times in a row
    running: bool = True              # the run is still running (else: its last result)
    due: float = 0.0                  # next probe (monotonic)


class Host(Protocol):
    registry: Registry
    monitor: Monitor
    reconciling: bool

    def runtime(self, name: str) -> Runtime: ...


class Checks:
    def __init__(self, host: Host, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, tick_s: float = TICK_S) -> None:
        self.host = host
        self.clock, self.wall, self.tick_s = clock, wall, tick_s
        self._states: dict[Key, CheckState] = {}
        self._failed: dict[Key, int] = {}   # counted failures, for /metrics
        self._lock = threading.Lock()       # _states, _failed
        self._ticking = threading.Lock()    # one tick at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Between two views only the due are probed (_due_now): the view the last whole
        # pass read, each running component's record, and a heap of (due, key).
        self._passed: View | None = None
        self._comps: dict[Key, ComponentRecord] = {}
        self._heap: list[tuple[float, Key]] = []

    # -- the read API ----------------------------------------------------------------

    def result(self, service: str, component: str) -> CheckState | None:
        """A copy of the component's check state, None before its first running view."""
        with self._lock:
            st = self._states.get((service, component))
            return replace(st) if st is not None else None

    def healthy_for(self, service: str, component: str) -> float:
        """Seconds the component has passed every check in a row (0 while failing,
        before its first pass this run, or while it does not run), up to when its last
        pass stops vouching: a probe in flight past its due time (a hung workload, the
        probe waiting out its timeout) adds none."""
        st = self.result(service, component)
        if st is None or st.healthy_since is None:
            return 0.0
        return max(min(self.wall(), st.vouched_until) - st.healthy_since, 0.0)

    def unhealthy(self) -> dict[Key, tuple[Run, str]]:
        """Unhealthy running components: their run and why (the reconciler's input)."""
        with self._lock:
            return {k: (s.run, reason(s)) for k, s in self._states.items()
                    if s.unhealthy and s.running}

    def failure_counts(self) -> dict[Key, int]:
        """Failed probes of runs that had passed, per component (a counter)."""
        with self._lock:
            return dict(self._failed)

    def fresh(self, service: str | None = None) -> None:
        """Before a read (of ``service`` alone, if given: a deploy's answer costs the same
        whatever else the node runs): probe what is due now without the thread (``mcp
        --local``), and with it a run it has not probed yet (a read just after a deploy, a
        restart or the agent's own start sees the run checked, not ``starting`` until the
        next tick)."""
        self.tick(unseen_only=self._thread is not None, service=service)

    # -- the thread ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="mcp-checks",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:   # noqa: BLE001 - the checker must survive a bad round
                log.exception("checks: tick failed")

    # -- one tick --------------------------------------------------------------------

    def tick(self, view: View | None = None, unseen_only: bool = False,
             service: str | None = None) -> None:
        """Probe every running component (of ``service``) whose probe is due
        (``unseen_only``: only runs never probed), from ``view`` (default: the monitor's
        last one), and act on what changed."""
        # A read does not wait for the thread's tick (its probes may take their timeouts).
        if not self._ticking.acquire(blocking=not unseen_only):
            return
        try:
            events, restart = self._tick(view or self.host.monitor.view, unseen_only, service)
        finally:
            self._ticking.release()
        if events and self.host.reconciling:
            try:
                self.host.registry.record_observed(events)
            except MCPError as exc:
                log.warning("checks: events not recorded: %s", exc)
        if restart and self.host.reconciling:
            self.host.monitor.poke()   # the reconciler restarts it in the next round

    def _tick(self, view: View, unseen_only: bool = False,
              service: str | None = None) -> tuple[list[Event], bool]:
        if view is self._passed and not unseen_only and service is None:
            return self._act(self._due_now())
        due: list[tuple[Key, ComponentRecord, CheckState]] = []
        known = self._pass(view, unseen_only, service, due)
        out = self._act(due, READ_PROBE_S if unseen_only else None)
        with self._lock:   # what the view no longer has (one service's tick: of it)
            for key in (set(self._states) | set(self._comps)) - known:
                if service is None or key[0] == service:
                    self._states.pop(key, None)
                    self._comps.pop(key, None)
                    self._failed.pop(key, None)
            if service is None and not unseen_only:   # the next ticks take the due alone
                self._passed = view
                self._heap = [(st.due, key) for key, st in self._states.items()
                              if st.running and key in self._comps]
                heapq.heapify(self._heap)
        return out

    def _due_now(self) -> list[tuple[Key, ComponentRecord, CheckState]]:
        """The view is the one the last whole pass read: only what is due now, from the
        heap of due times (an idle node's tick costs what is due, not every component)."""
        now, out, seen = self.clock(), [], set()
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _due, key = heapq.heappop(self._heap)
                st, comp = self._states.get(key), self._comps.get(key)
                if st is None or comp is None or not st.running or st.due > now or \
                        key in seen:
                    continue   # gone, stopped, or an older entry of a rescheduled probe
                seen.add(key)
                out.append((key, comp, st))
        return out

    def _act(self, due: list[tuple[Key, ComponentRecord, CheckState]],
             budget: float | None = None) -> tuple[list[Event], bool]:
        events: list[Event] = []
        restart = False
        for (key, comp, st), res in zip(due, self._probe_all(due, budget), strict=True):
            event = self._note(key, comp, st, res)
            if event is not None:
                events.append(event)
                restart = restart or (st.unhealthy and wants_restart(comp.defn.restart, None))
        return events, restart

    def _pass(self, view: View, unseen_only: bool, service: str | None,
              due: list[tuple[Key, ComponentRecord, CheckState]]) -> set[Key]:
        """Every component of the view (of ``service``): a run that stopped is noted, a
        new one begins its state, and what is due goes to ``due``; returns the keys."""
        known: set[Key] = set()
        for rec in view.records if service is None else \
                [r for r in view.records if r.name == service]:
            for comp in rec.components:
                key = (rec.name, comp.defn.name)
                known.add(key)
                w = view.workloads.get(key)
                if comp.defn.runtime in view.errors:
                    continue   # its runtime could not be listed: nothing is known
                if rec.undeploying or w is None or w.state != RUNNING or w.paused or \
                        w.runtime != comp.defn.runtime:
                    self._not_running(key)
                    continue
                st = self._current(key, (w.id, w.started_at), effective(comp.defn))
                self._comps[key] = comp
                if self.clock() < st.due or (unseen_only and st.time is not None):
                    continue
                due.append((key, comp, st))
        return known

    def _not_running(self, key: Key) -> None:
        with self._lock:
            st = self._states.get(key)
            if st is not None:
                st.running, st.healthy_since = False, None

    def _current(self, key: Key, run: Run, kind: str) -> CheckState:
        with self._lock:
            st = self._states.get(key)
            if st is None or st.run != run:
                st = self._states[key] = CheckState(run=run, check=kind)
            st.check, st.running = kind, True
            return st

    def _probe_all(self, due: list[tuple[Key, ComponentRecord, CheckState]],
                   budget: float | None = None) -> list[Result]:
        """The due probes side by side: one hung component's timeout must not hold up
        the others' checks (and so their restarts). ``budget``: each probe's timeout at
        most that. A ``tcp`` check its runtime proves by a plain connect is one of the
        connects this thread waits on together; the rest go to the pool."""
        plain = [i for i, (key, comp, _st) in enumerate(due)
                 if effective(comp.defn) == "tcp" and self._by_connect(key[0], comp)]
        out: dict[int, Result] = self._connect_all(
            {i: due[i][1] for i in plain}, budget) if plain else {}
        rest = [i for i in range(len(due)) if i not in out]
        if len(rest) <= 1:
            out.update((i, self._probe(due[i][0][0], due[i][1], budget)) for i in rest)
        else:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="mcp-check")
                pool = self._pool
            out.update(zip(rest, pool.map(
                lambda i: self._probe(due[i][0][0], due[i][1], budget), rest), strict=True))
        return [out[i] for i in range(len(due))]

    def _by_connect(self, service: str, comp: ComponentRecord) -> bool:
        try:
            return self.host.runtime(comp.defn.runtime).tcp_by_connect(service, comp.defn.name)
        except MCPError:
            return False   # _probe says why

    def _connect_all(self, comps: dict[int, ComponentRecord],
                     budget: float | None) -> dict[int, Result]:
        """``tcp`` checks of ``comps`` (by index) from one round of ``connect_all``."""
        timeouts = {i: self._timeout(c, budget) for i, c in comps.items()}
        answers = connect_all({p: timeouts[i] for i, c in comps.items()
                               for p in ports_of(c.defn, c.host_ports)})
        return {i: check(c.defn, c.host_ports, timeouts[i], lambda p, _t: answers[p])
                for i, c in comps.items()}

    @staticmethod
    def _timeout(comp: ComponentRecord, budget: float | None) -> float:
        t = comp.defn.check_timeout_s
        return t if budget is None else min(t, budget)

    def _probe(self, service: str, comp: ComponentRecord,
               budget: float | None = None) -> Result:
        d = comp.defn
        timeout = self._timeout(comp, budget)
        try:
            rt = self.host.runtime(d.runtime)
        except MCPError as exc:
            return Result(False, f"runtime: {exc}"[:120])

        def tcp(port: int, timeout: float) -> str:
            return rt.tcp_check(service, d.name, port, timeout)

        try:
            return check(d, comp.host_ports, timeout, tcp)
        except Exception as exc:   # noqa: BLE001 - a probe's bug is a failed check
            log.exception("checks: probe of %s/%s failed", service, d.name)
            return Result(False, f"probe error: {type(exc).__name__}")

    def _note(self, key: Key, comp: ComponentRecord, st: CheckState,
              res: Result) -> Event | None:
        """Record one result; the event of a change to or from unhealthy, if any."""
        d, now = comp.defn, self.wall()
        with self._lock:
            st.ok, st.time, st.detail = res.ok, now, res.detail
            event = None
            if res.ok:
                if st.unhealthy:
                    event = Event(key[0], key[1], now, RUNNING, RUNNING,
                                  f"healthy again: {st.check} check passes ({res.detail})",
                                  unplanned=False)
                st.failures, st.unhealthy, st.passed = 0, False, True
                st.healthy_since = st.healthy_since or now
                st.vouched_until = now + d.check_interval_s if d.check_interval_s > 0 \
                    else math.inf
            else:
                st.healthy_since = None
                if st.passed:
                    st.failures += 1
                    self._failed[key] = self._failed.get(key, 0) + 1
                    if st.failures >= d.check_failures and not st.unhealthy:
                        st.unhealthy = True
                        then = ("restarting it" if wants_restart(d.restart, None)
                                else "not restarted (restart = no)")
                        event = Event(key[0], key[1], now, RUNNING, RUNNING,
                                      f"{reason(st)}: {then}")
                        log.warning("checks: %s/%s %s; %s", *key, reason(st), then)
            if not st.passed:
                st.due = 0.0                                   # every tick until it passes
            elif d.check_interval_s == 0:
                st.due = float("inf")                          # once per run
            else:
                st.due = self.clock() + d.check_interval_s
            if st.due != float("inf"):
                heapq.heappush(self._heap, (st.due, key))
            return event


def reason(st: CheckState) -> str:
    """Why a component is unhealthy, e.g. ``unhealthy (tcp: connection refused x3)``."""
    return f"unhealthy ({st.check}: {st.detail} x{st.failures})"
