"""Read-only views of the node: ``ps`` rows and ``status``, from the registry,
the monitor's last view and the reconciler's restart bookkeeping.

A row's ``state`` is what an operator needs to know, not only what the runtime
says: ``starting`` until the check passes once per run, ``unhealthy`` once it failed
``check_failures`` times in a row (``checks``), ``backoff`` while a restart waits its
turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .errors import MCPError, NotFoundError
from .monitor import View, is_drift
from .records import ComponentRecord, Event, ServiceRecord, definition_digest
from .rollout import Rollouts, Seen
from .runtime import Workload
from .states import BACKOFF, MISSING, RUNNING, STARTING, UNHEALTHY, UNKNOWN, State

if TYPE_CHECKING:
    from .checks import Checks
    from .config import AgentConfig
    from .converge import Steps
    from .monitor import Monitor
    from .reconcile import Reconciler
    from .registry import Registry
    from .runtime import Runtime, WorkloadSpec


class Host(Protocol):
    """What the views read of the node's agent."""

    node: str
    config: AgentConfig
    registry: Registry
    monitor: Monitor
    reconciler: Reconciler
    checks: Checks
    rollouts: Rollouts
    steps: Steps

    @property
    def node_routes(self) -> Any: ...

    def runtime(self, name: str) -> Runtime: ...

    def spec(self, service: str, comp: ComponentRecord) -> WorkloadSpec: ...


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


EVENT_POLL_S = 0.5   # events are rows in SQLite; a follower looks for new ones this often
RESUME_MAX = 10000   # events sent at once to a follow resumed after an id


def event_dict(e: Event) -> dict[str, Any]:
    return {"id": e.id, "time": rfc3339_ms(e.time), "service": e.service,
            "component": e.component, "from": e.prev_state, "to": e.new_state,
            "detail": e.detail, "unplanned": e.unplanned}


def rfc3339_ms(t: float) -> str:
    """Event times keep their milliseconds: several changes can fall in one second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Views:
    def __init__(self, host: Host) -> None:
        self.a = host

    def _row(self, svc: ServiceRecord, comp: ComponentRecord, view: View,
             now: float) -> dict[str, Any]:
        w = view.workloads.get((svc.name, comp.defn.name))
        state = self._state(svc, comp, view)
        uptime = int(now - w.started_at) if w and w.state == RUNNING and w.started_at else 0
        return {
            "service": svc.name, "component": comp.defn.name, "node": self.a.node,
            "runtime": comp.defn.runtime, "state": state, "desired_state": comp.desired_state,
            "version": comp.defn.version, "uptime_s": max(uptime, 0),
            "routes": [
                {"name": r.name, "port": r.port, "mode": r.mode, "hostname": r.hostname,
                 "host_port": comp.host_ports.get(r.name)}
                for r in comp.defn.routes
            ],
        }

    def _state(self, svc: ServiceRecord, comp: ComponentRecord, view: View) -> str:
        """The component's state as ``ps`` shows it."""
        key = (svc.name, comp.defn.name)
        w = view.workloads.get(key)
        state = w.state if w else (UNKNOWN if comp.defn.runtime in view.errors else MISSING)
        if state != RUNNING and key in self.a.reconciler.last.waiting:
            return BACKOFF
        if w is not None and state == RUNNING:
            return self._running_state(key, w)
        return state

    def _running_state(self, key: tuple[str, str], w: Workload) -> State:
        """``starting`` until this run's check passed once, ``unhealthy`` once it failed
        ``check_failures`` times in a row, else ``running``."""
        st = self.a.checks.result(*key)
        if st is None or st.run != (w.id, w.started_at) or not st.passed:
            return STARTING
        return UNHEALTHY if st.unhealthy else RUNNING

    def _check(self, key: tuple[str, str], w: Workload | None) -> dict[str, Any] | None:
        """The last check result of the current (or, stopped, the last) run."""
        st = self.a.checks.result(*key)
        if st is None or st.time is None or (w is not None and st.run != (w.id, w.started_at)):
            return None
        return {"ok": st.ok, "time": rfc3339(st.time), "detail": st.detail}

    def ps(self) -> list[dict[str, Any]]:
        view = self.a.monitor.fresh_view()
        self.a.checks.fresh()
        now = time.time()
        return [self._row(s, c, view, now) for s in self.a.registry.list_services()
                for c in s.components]

    def seen(self, service: str, components: tuple[str, ...]) -> dict[str, Seen]:
        """A rollout's changed components as the last round saw them (rollout.judge)."""
        view, out = self.a.monitor.view, {}
        svc = view.record(service)
        if svc is None:     # deployed since that view was made
            try:
                svc = self.a.registry.get_service(service)
            except NotFoundError:
                return {}
        for c in svc.components:
            if c.defn.name in components:
                state = self._state(svc, c, view)
                st = self.a.checks.result(service, c.defn.name)
                out[c.defn.name] = Seen(
                    state, self.a.checks.healthy_for(service, c.defn.name)
                    if state == RUNNING else 0.0,
                    f"{st.check}: {st.detail}" if st is not None and st.detail else "")
        return out

    def status(self, svc: ServiceRecord) -> dict[str, Any]:
        view = self.a.monitor.fresh_view()
        self.a.checks.fresh(svc.name)
        now = time.time()
        comps = []
        for c in svc.components:
            row = self._row(svc, c, view, now)
            w = view.workloads.get((svc.name, c.defn.name))
            row["image"] = c.defn.image
            row["ready"] = row["state"] == RUNNING
            row["drift"] = is_drift(c.desired_state, RUNNING if row["state"] in (
                STARTING, UNHEALTHY) else row["state"])
            row["check"] = self._check((svc.name, c.defn.name), w)
            row["flapping"] = (svc.name, c.defn.name) in view.flapping
            # which run this is: a follow tells a replace from the same run by it
            up = w is not None and w.state == RUNNING
            row["started_at"] = rfc3339_ms(w.started_at) if up and w and w.started_at else None
            row["workload_id"] = (w.id[:12] or None) if up and w else None
            row.update(self._restart_fields(svc.name, c, w))
            row.update(self._status_extra(svc.name, c, w))
            if self.a.config.proxy.serve_routes:   # URL, certificate, DNS, proxy (issue 11)
                row["routes"] = self.a.node_routes.describe(svc.name, c.defn.name,
                                                            row["routes"])
            comps.append(row)
        return {
            "service": svc.name, "active": svc.active, "node": self.a.node,
            "definition": svc.definition().to_dict(),
            "drift": any(c["drift"] for c in comps),
            "flapping": any(c["flapping"] for c in comps),
            "components": comps,
            "events": [
                event_dict(e) for e in self.a.registry.events(svc.name, limit=20)
            ],
            "rollout": r.to_dict() if (r := self.a.rollouts.of(svc.name)) else None,
        }

    def _restart_fields(self, service: str, comp: ComponentRecord,
                        w: Workload | None) -> dict[str, Any]:
        key = (service, comp.defn.name)
        b = self.a.reconciler.backoff.get(key)
        due = self.a.reconciler.last.waiting.get(key)
        return {
            "restarts": b.restarts if b else 0,
            # the last run's, never once a new run is up (a SIGKILLed stop's 137)
            "exit_code": None if w is not None and w.state == RUNNING else
            w.exit_code if w is not None and w.exit_code is not None else (
                b.exit_code if b else None),
            "next_attempt": rfc3339(time.time() + due - self.a.reconciler.clock()) if due else None,
            # not while a start-first replace runs: the old workload serves under the
            # new record until the switch (health says so too)
            "spec_drift": bool(w and w.spec_digest and key not in self.a.steps.replacing
                               and w.spec_digest != self.a.spec(service, comp).digest),
        }

    def _status_extra(self, service: str, comp: ComponentRecord,
                      observed: Workload | None) -> dict[str, Any]:
        """What the component's runtime adds to its status; nothing if it cannot load."""
        try:
            rt = self.a.runtime(comp.defn.runtime)
        except MCPError:
            return {}
        spec = self.a.spec(service, comp)
        extra = rt.status_extra(spec, observed)
        return {**extra, "address": spec.net.address} if spec.net else extra

    # -- events ------------------------------------------------------------------

    def events(self, service: str | None, tail: int) -> list[dict[str, Any]]:
        if service is not None:
            self.a.registry.get_service(service)   # NotFoundError names the known ones
        return [event_dict(e) for e in self.a.registry.events(service, limit=tail)]

    def event_stream(self, service: str | None, tail: int, after: int = 0) -> Iterator[bytes]:
        """The last ``tail`` events (or, ``after`` an id, every later one: a follow
        resumed), then each new one, one JSON object a line. Yields ``b""`` between polls
        so whoever pumps it can stop it while nothing happens."""
        if service is not None:
            self.a.registry.get_service(service)
        return self._stream(service, tail, after)

    def _stream(self, service: str | None, tail: int, after: int = 0) -> Iterator[bytes]:
        last = after
        batch = (self.a.registry.events(service, limit=RESUME_MAX, after_id=after) if after
                 else self.a.registry.events(service, limit=tail) if tail else [])
        if not tail and not after:
            newest = self.a.registry.events(service, limit=1)
            last = newest[-1].id if newest else 0
        while True:
            for e in batch:
                last = e.id
                yield json.dumps(event_dict(e), separators=(",", ":")).encode() + b"\n"
            yield b""
            time.sleep(EVENT_POLL_S)
            batch = self.a.registry.events(service, limit=1000, after_id=last)

    # -- history -----------------------------------------------------------------

    def history(self, name: str) -> list[dict[str, Any]]:
        """Each deployed version, oldest first; raises NotFoundError."""
        rows = self.a.registry.history(name)
        if not rows:
            raise NotFoundError(f"no deployments of service {name!r}")
        digest = (definition_digest(self.a.registry.get_service(name).definition())
                  if self.a.registry.has_service(name) else "")
        current = max((d.version for d in rows if d.digest == digest), default=0)
        return [{"service": name, "version": d.version, "time": rfc3339(d.time),
                 "digest": d.digest, "current": d.version == current,
                 "images": [c.image for c in d.definition.components],
                 "image_digests": [c.image_digest for c in d.definition.components],
                 **({"note": d.note} if d.note else {})} for d in rows]
