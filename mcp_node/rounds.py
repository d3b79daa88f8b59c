"""What each monitor round does besides listing, and the health it leaves behind.

After the monitor compares the registry with the runtimes, the daemon
reconciles (reconcile.py), keeps component routes (noderoutes) and edge routes
in step on their timers, and judges health (health.py) from what it saw; the
HTTP health answer reads that judgement instead of asking anything again.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from . import health, stateprobe, views
from .monitor import View

if TYPE_CHECKING:
    from .edge import EdgeManager
    from .runtime import Runtime


class Host(views.Host, Protocol):
    """What a round uses of the node's agent: what the views read, and more."""

    reconciling: bool
    started_at: float

    @property
    def edge(self) -> EdgeManager: ...

    @property
    def edge_loaded(self) -> bool: ...

    @property
    def runtime_names(self) -> tuple[str, ...]: ...

    def loaded_runtimes(self) -> dict[str, Runtime]: ...


log = logging.getLogger("mcp_node.agent")


def prune_history(agent: Host) -> None:
    """Forget the history of services undeployed too long ago or beyond the cap, and
    events past their age (``[history]``); after an undeploy and in every round. Never
    raises: an undeploy has succeeded by then, and a round must go on."""
    h = agent.config.history
    try:
        gone = agent.registry.prune_history(h.keep_undeployed_days * 86400,
                                            h.max_undeployed_services)
        aged = agent.registry.prune_events(h.event_keep_days * 86400)
    except Exception:
        log.exception("history: prune failed")
        return
    for name in gone:
        log.info("history: forgot undeployed service=%s", name)
    if aged:
        log.info("history: forgot %d events older than %g days", aged, h.event_keep_days)


class Rounds:
    def __init__(self, host: Host) -> None:
        self.a = host
        self._health: dict[str, Any] = {}
        self._health_of: View | None = None   # the view it was judged from
        self._edge_checked = time.time()
        self._routes_checked = time.time()
        self._edge_reasons: list[str] = []

    def reconcile_edge(self) -> None:
        try:
            for action in self.a.edge.reconcile():
                log.info("edge: %s", action)
        except Exception:
            log.exception("edge reconcile failed")

    def after_round(self, view: View) -> None:
        """After each monitor round: reconcile, edge checks, renewals on their own timer,
        health."""
        if self.a.reconciling:
            done = self.a.reconciler.run(view.records, view.workloads, view.orphans, view.errors)
            if done:
                self.a.monitor.poke()
        now = time.time()
        if self.a.reconciling and self.a.config.proxy.serve_routes:
            due = now - self._routes_checked >= self.a.config.monitor.edge_interval_s
            self._routes_checked = now if due else self._routes_checked
            self.a.node_routes.reconcile(reassert=due)
        # A node without edge routes is no edge node: its proxy and CA are not its concern,
        # and the edge modules (cryptography, dnspython) are not even loaded.
        edge_routes = len(self.a.registry.list_edge_routes())
        has_routes = self.a.edge_loaded or edge_routes > 0
        if has_routes and self.a.monitor.running and \
                now - self._edge_checked >= self.a.config.monitor.edge_interval_s:
            self._edge_checked = now
            self.reconcile_edge()
        try:
            self._edge_reasons = self.a.edge.health() if has_routes else []
        except Exception as exc:  # a broken edge degrades health, never breaks it
            self._edge_reasons = [f"edge: {exc}"]
        self._health, self._health_of = self._compute(view, edge_routes), view
        prune_history(self.a)

    def _compute(self, view: View, edge_routes: int) -> dict[str, Any]:
        runtimes: dict[str, Any] = {}
        runtime_reasons: list[str] = []
        loaded = self.a.loaded_runtimes()
        for name in self.a.runtime_names:
            rt = loaded.get(name)
            info: dict[str, Any] = {"available": name not in view.errors}
            if name in view.errors:
                info["reason"] = view.errors[name]
            if rt is not None:
                try:
                    info.update(rt.info())
                    runtime_reasons.extend(rt.health_reasons())
                except Exception as exc:  # health must not fail because a probe did
                    info["reason"] = str(exc)
            runtimes[name] = info
        return health.compute(view, health.Inputs(
            node=self.a.node, runtimes=runtimes, runtime_reasons=runtime_reasons,
            spec_drift=[f"{s}/{c}" for s, c in self._spec_drift(view)],
            held_down=sorted(f"{s}/{c}" for s, c in self.a.reconciler.last.held),
            host_paths=[f"{s}/{c}: {why}"
                        for (s, c), why in sorted(self.a.reconciler.escaped.items())],
            edge_reasons=self._edge_reasons + (self.a.node_routes.health() if
                                               self.a.config.proxy.serve_routes else []),
            edge_routes=edge_routes,
            monitor_error=self.a.monitor.last_error,
            state_dir=stateprobe.probe(self.a.config.state_dir),
            replacing=frozenset(self.a.steps.replacing)))

    def _spec_drift(self, view: View) -> list[tuple[str, str]]:
        """Components whose workload differs from their record; not one a start-first
        replace is replacing now (its record is the new one while the old one serves)."""
        out = []
        replacing = set(self.a.steps.replacing)
        for rec in view.records:
            for c in rec.components:
                if (rec.name, c.defn.name) in replacing:
                    continue
                w = view.workloads.get((rec.name, c.defn.name))
                if w is not None and w.spec_digest and w.runtime == c.defn.runtime and \
                        w.spec_digest != self.a.reconciler.digest(rec, c):
                    out.append((rec.name, c.defn.name))
        return out

    def health(self) -> dict[str, Any]:
        """The daemon answers from its last round; without a monitor thread (``--local``,
        tests) health is judged now, so it never shows a state from before a change."""
        if not self.a.monitor.running:
            self.a.monitor.refresh_safely()   # its callback is after_round
        view = self.a.monitor.view
        if not self._health:
            self.after_round(view)
        elif view is not self._health_of:   # an operation refreshed one service since
            self._health, self._health_of = self._compute(
                view, len(self.a.registry.list_edge_routes())), view
        out = dict(self._health)
        out["uptime_s"] = int(time.monotonic() - self.a.started_at)
        interval = self.a.config.monitor.interval_s
        age = time.time() - self.a.monitor.view.refreshed_at
        if self.a.monitor.running and age > 3 * interval:
            out["status"] = "degraded"
            out["reasons"] = [*out["reasons"], f"monitor stalled: no refresh for "
                              f"{age:.0f} s"]
        return out
