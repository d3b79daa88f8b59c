"""Reconcile: the actions that drive observed state to desired state.

``plan`` is pure: from the registry records, the monitor's view of the
runtimes and each component's restart bookkeeping it returns what to do,
and why. The agent carries the actions out under each service's lock. A
workload whose spec digest differs from the one its record implies is
*spec drift* (a deploy interrupted half-way, an old container left behind)
and is replaced; a workload no record owns is removed.

Restart policies (design §9): ``no`` reports only; ``on-failure`` restarts
after a non-zero (or unknown) exit; ``always`` and ``unless-stopped`` (the
default) restart after any exit. Restarts back off exponentially from
``BACKOFF_START_S`` to the configured cap, and the count resets once a
component has run for ``reset_after_s``.

A (re)start the runtime refuses because a volume's host path is missing or now
resolves outside the volume roots (HostPathError: a workload swapped a symlink
into a directory it can write) stops the component and holds it down, with one
event naming the path and a health reason, instead of a restart loop; the paths
are checked again each round (no runtime call) and it comes back once they pass.

A running component the checker found unhealthy (its check failed ``check_failures``
times in a row, ``checks``) is restarted as if it had exited, policy and backoff
alike: stopped with ``UNHEALTHY_STOP_S`` of grace (a hung process will not end
itself), then started again.

Interrupted operations (issue 18): a service marked ``undeploying`` (its undeploy
began and was cut short) is finished, its remaining workloads removed and the record
deleted; a workload whose process lives but whose guest does not run (``paused``: a
VM left in ``prelaunch`` by an agent killed before ``cont``) is resumed, or replaced
when it cannot be, whatever its restart policy (it never exited).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import HostPathError, MCPError, NotFoundError, ValidationError
from .grammar import parse_volumes, resolve_volumes, volume_roots
from .records import ComponentRecord, Event, ServiceRecord
from .registry import Registry
from .runtime import Runtime, Workload, WorkloadSpec
from .states import RUNNING

if TYPE_CHECKING:
    from .config import AgentConfig

log = logging.getLogger("mcp_node.reconcile")

BACKOFF_START_S = 1.0
UNHEALTHY_STOP_S = 2.0

Run = tuple[str, float | None]   # (workload id, started_at)


def same_run(a: Run, w: Workload) -> bool:
    """``w`` is run ``a``: podman's listing gives whole seconds, its inspect fractions."""
    return a[0] == w.id and (a[1] == w.started_at or (
        a[1] is not None and w.started_at is not None and abs(a[1] - w.started_at) < 1.0))

Key = tuple[str, str]


@dataclass(frozen=True)
class Action:
    kind: str          # "run" (create anew) | "start" (existing) | "stop" | "remove"
    #                    | "resume" (paused) | "undeploy" (finish one: whole service)
    #                    | "restart" (running, unhealthy: stop, then start)
    service: str
    component: str
    runtime: str
    reason: str
    restart: bool = False   # counts as a restart of a component that exited


@dataclass
class Backoff:
    """Restart bookkeeping of one component (in memory; monotonic times)."""

    restarts: int = 0
    exit_code: int | None = None
    next_attempt: float = 0.0
    running_since: float | None = None

    def delay(self, cap_s: float) -> float:
        return float(min(cap_s, BACKOFF_START_S * 2.0 ** min(max(self.restarts - 1, 0), 32)))


@dataclass
class Policy:
    backoff_cap_s: float = 60.0
    reset_after_s: float = 60.0


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    waiting: dict[Key, float] = field(default_factory=dict)   # in backoff until (monotonic)
    held: dict[Key, str] = field(default_factory=dict)        # down and left down, why
    escaped: dict[Key, str] = field(default_factory=dict)     # held: a host path fails


def wants_restart(policy: str, exit_code: int | None) -> bool:
    if policy == "no":
        return False
    if policy == "on-failure":
        return exit_code != 0
    return True   # always, unless-stopped, "" (the default)


def plan(
    records: Iterable[ServiceRecord],
    workloads: dict[Key, Workload],
    orphans: Iterable[Workload],
    digest: Callable[[ServiceRecord, ComponentRecord], str],
    backoff: dict[Key, Backoff],
    now: float,
    policy: Policy,
    skip_runtimes: Iterable[str] = (),
    blocked: Mapping[Key, str] | None = None,
    unhealthy: Mapping[Key, tuple[Run, str]] | None = None,
) -> Plan:
    """What to do now; ``backoff`` is updated in place (exit codes, resets).
    ``blocked``: components held down because a host path failed, and why.
    ``unhealthy``: running components whose check fails, their run and why."""
    out = Plan()
    skip = set(skip_runtimes)
    for rec in records:
        if rec.undeploying:
            if not any(c.defn.runtime in skip for c in rec.components):
                out.actions.append(Action("undeploy", rec.name, "", "", "undeploy interrupted"))
            continue
        for comp in rec.components:
            d = comp.defn
            key = (rec.name, d.name)
            if d.runtime in skip:
                continue   # that runtime could not be listed: we cannot tell
            w = workloads.get(key)
            if w is not None and w.runtime != d.runtime:
                w = None
            b = backoff.setdefault(key, Backoff())
            if comp.desired_state != RUNNING:
                b.restarts, b.running_since = 0, None
                if w is not None and (w.state == RUNNING or w.paused):
                    out.actions.append(Action("stop", rec.name, d.name, d.runtime,
                                              "desired stopped"))
                continue
            if blocked and key in blocked:
                out.escaped[key] = blocked[key]
                continue
            want = digest(rec, comp)
            if w is not None and w.spec_digest and w.spec_digest != want:
                out.actions.append(Action("run", rec.name, d.name, d.runtime,
                                          f"spec drift ({w.spec_digest} != {want})"))
                continue
            if w is not None and w.paused:
                out.actions.append(Action("resume", rec.name, d.name, d.runtime,
                                          f"found {w.paused}"))
                continue
            if w is not None and w.state == RUNNING:
                if b.running_since is None:
                    b.running_since = now
                elif now - b.running_since >= policy.reset_after_s:
                    b.restarts = 0
                sick = unhealthy.get(key) if unhealthy else None
                if sick is not None and same_run(sick[0], w) and \
                        wants_restart(d.restart, None):
                    if now < b.next_attempt:
                        out.waiting[key] = b.next_attempt
                    else:
                        out.actions.append(Action("restart", rec.name, d.name, d.runtime,
                                                  sick[1], restart=True))
                continue
            # Down: exited (w stopped) or gone (w None).
            if w is not None:
                b.exit_code = w.exit_code
            b.running_since = None
            if not wants_restart(d.restart, b.exit_code if w is not None else None):
                out.held[key] = f"restart={d.restart or 'unless-stopped'}"
                continue
            if now < b.next_attempt:
                out.waiting[key] = b.next_attempt
                continue
            kind = "start" if w is not None else "run"
            why = ("missing" if w is None else f"exited ({w.exit_code})"
                   if w.exit_code is not None else "stopped (no exit code)")  # never ran
            out.actions.append(Action(kind, rec.name, d.name, d.runtime, why, restart=True))
    # Orphans first: one left by a start-first replace an agent crash cut holds the
    # host ports its component's record now names.
    out.actions[:0] = [Action("remove", w.service, w.component, w.runtime,
                              "orphan: no service record owns it")
                       for w in orphans if w.runtime not in skip]
    return out


def note_attempt(b: Backoff, now: float, policy: Policy) -> None:
    """After an automatic (re)start: count it and set the next earliest attempt."""
    b.restarts += 1
    b.next_attempt = now + b.delay(policy.backoff_cap_s)


def still_wanted(a: Action, rec: ServiceRecord | None, w: Workload | None,
                 digest: Callable[[ServiceRecord, ComponentRecord], str]) -> bool:
    """Re-judge an action under the service lock, against the record and workload as
    they are now (the listing it was planned from may predate a deploy)."""
    comp = next((c for c in rec.components if c.defn.name == a.component), None) if rec else None
    if comp is not None and comp.defn.runtime != a.runtime:
        comp = None
    if a.kind == "undeploy":
        return rec is not None and rec.undeploying
    if a.kind == "remove":
        return comp is None and w is not None
    if comp is None or rec is None or rec.undeploying:
        return False
    if a.kind == "stop":
        return comp.desired_state != RUNNING and w is not None and (
            w.state == RUNNING or bool(w.paused))
    if comp.desired_state != RUNNING:
        return False
    if a.kind == "resume":
        return w is not None and bool(w.paused) and w.spec_digest in ("", digest(rec, comp))
    if a.kind == "restart":
        return w is not None and w.state == RUNNING
    if not a.restart:  # spec drift
        return w is not None and bool(w.spec_digest) and w.spec_digest != digest(rec, comp)
    return w is None or w.state != RUNNING


class Host(Protocol):
    """What the reconciler needs of the agent."""

    registry: Registry
    config: AgentConfig
    state_dir: Path

    def runtime(self, name: str) -> Runtime: ...

    def spec(self, service: str, comp: ComponentRecord) -> WorkloadSpec: ...

    def _service_lock(self, name: str, wait: bool = True) -> AbstractContextManager[bool]: ...


class Reconciler:
    """Carries out ``plan`` for the daemon; keeps restart bookkeeping between rounds."""

    def __init__(self, host: Host, policy: Policy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.policy = policy
        self.clock = clock
        self.backoff: dict[Key, Backoff] = {}
        self.escaped: dict[Key, str] = {}   # held down: a host path failed at (re)start
        self._digests: dict[int, tuple[ComponentRecord, str]] = {}   # id(record) -> digest
        # May this service be started now? A fleet member's fence says no while its
        # lease is not known alive (issue 18); a single node always may.
        self.gate: Callable[[str], bool] = lambda service: True
        # Running components whose check fails (checks.Checks.unhealthy): set by the agent.
        self.unhealthy: Callable[[], Mapping[Key, tuple[Run, str]]] = dict
        self.last = Plan()

    def digest(self, rec: ServiceRecord, comp: ComponentRecord) -> str:
        """The spec digest ``comp`` should run: a pure function of the record, kept for
        the record object (the registry hands out the same ones while nothing changed),
        so an idle round does not hash every component again (issue 21)."""
        hit = self._digests.get(id(comp))
        if hit is not None and hit[0] is comp:
            return hit[1]
        digest = self.host.spec(rec.name, comp).digest
        self._digests[id(comp)] = (comp, digest)
        return digest

    def run(self, records: list[ServiceRecord], workloads: dict[Key, Workload],
            orphans: list[Workload], errors: Iterable[str]) -> list[str]:
        """Plan from a monitor view and act; returns what was done, for the log."""
        self._recheck(records, workloads)
        known = {(r.name, c.defn.name) for r in records for c in r.components}
        for key in [k for k in self.backoff if k not in known]:   # undeployed: its
            del self.backoff[key]                                # metric series goes too
        current = {id(c) for r in records for c in r.components}
        for ident in [i for i in self._digests if i not in current]:   # records replaced
            del self._digests[ident]
        self.last = plan(records, workloads, orphans, self.digest, self.backoff,
                         self.clock(), self.policy, errors, self.escaped, self.unhealthy())
        done = []
        for a in self.last.actions:
            with self.host._service_lock(a.service, wait=False) as got:
                if got and self._act(a):
                    done.append(f"{a.kind} {a.service}/{a.component}: {a.reason}")
        return done

    def _act(self, a: Action) -> bool:
        try:
            rec: ServiceRecord | None = self.host.registry.get_service(a.service)
        except NotFoundError:
            rec = None
        if a.kind == "undeploy":
            return self._undeploy(a, rec)
        rt = self.host.runtime(a.runtime)
        try:
            w = rt.inspect(a.service, a.component)
            if not still_wanted(a, rec, w, self.digest) or (
                    a.kind == "restart" and not self._still_sick(a, w)):
                return False
            if a.kind not in ("remove", "stop") and not self.gate(a.service):
                log.info("reconcile: service=%s is fenced (its fleet lease is not known "
                         "alive): %s of %s waits", a.service, a.kind, a.component)
                return False
            log.info("reconcile %s service=%s component=%s: %s", a.kind, a.service,
                     a.component, a.reason)
            if a.kind == "remove":
                rt.remove(a.service, a.component)
            elif a.kind == "stop":
                rt.stop(a.service, a.component)
            elif a.kind == "resume":
                assert rec is not None
                if not rt.start(a.service, a.component):
                    rt.run(self.host.spec(a.service, rec.component(a.component)))
            else:
                assert rec is not None
                comp = rec.component(a.component)
                bk = self.backoff.setdefault((a.service, a.component), Backoff())
                if a.restart:
                    note_attempt(bk, self.clock(), self.policy)
                if a.kind == "restart":
                    bk.running_since = None   # the new run's time counts toward a reset
                    rt.stop(a.service, a.component, timeout=UNHEALTHY_STOP_S)
                if a.kind not in ("start", "restart") or not rt.start(a.service, a.component):
                    rt.run(self.host.spec(a.service, comp))
        except HostPathError as exc:
            self._hold(a, rt, exc)
            return True
        except MCPError as exc:
            log.warning("reconcile %s service=%s component=%s failed: %s", a.kind, a.service,
                        a.component, exc)
            self._event(a, f"reconcile {a.kind} failed: {exc}")
            return False
        if rec is not None and a.kind != "remove":
            b = self.backoff.get((a.service, a.component))
            detail = (f"restarted: {a.reason}, restart {b.restarts}"
                      if a.kind == "restart" and b else
                      f"restarted by agent after {a.reason}, restart {b.restarts}"
                      if a.restart and b else f"{a.kind}: {a.reason}")
            self._event(a, detail)
        return True

    def _still_sick(self, a: Action, w: Workload | None) -> bool:
        """A restart for unhealthiness is of the very run that failed, and it still does."""
        sick = self.unhealthy().get((a.service, a.component))
        return w is not None and sick is not None and same_run(sick[0], w)

    def _undeploy(self, a: Action, rec: ServiceRecord | None) -> bool:
        """Finish an interrupted undeploy: every component removed (a missing one is a
        no-op), then the record deleted; a failure leaves it marked for the next round."""
        if rec is None or not still_wanted(a, rec, None, self.digest):
            return False
        log.warning("reconcile: finishing the interrupted undeploy of service=%s", rec.name)
        try:
            for comp in rec.components:
                self.host.runtime(comp.defn.runtime).remove(rec.name, comp.defn.name)
            self.host.registry.delete_service(rec.name)
        except MCPError as exc:
            log.warning("reconcile undeploy service=%s failed: %s", rec.name, exc)
            return False
        log.info("undeployed service=%s (reconcile finished an interrupted undeploy)",
                 rec.name)
        return True

    def _hold(self, a: Action, rt: Runtime, exc: HostPathError) -> None:
        """A host path failed at (re)start: the component is stopped (a refused spec-drift
        replacement leaves the old workload running) and held down."""
        log.error("reconcile %s service=%s component=%s refused: %s; holding it down",
                  a.kind, a.service, a.component, exc)
        first = (a.service, a.component) not in self.escaped
        try:
            rt.stop(a.service, a.component)
        except MCPError as stop_exc:
            log.warning("reconcile: could not stop %s/%s: %s", a.service, a.component, stop_exc)
        if first:
            self._event(a, f"not started: {exc}; held down until its host paths pass again")
        # Published last: health reports the hold only once its stop and event are done.
        self.escaped[(a.service, a.component)] = str(exc)

    def _recheck(self, records: list[ServiceRecord], workloads: dict[Key, Workload]) -> None:
        """Release a held component whose host paths pass now, that runs (an operator's
        start passed the same check), or that is no longer desired running."""
        if not self.escaped:
            return
        roots = volume_roots(self.host.config.podman.volume_roots, self.host.state_dir)
        comps = {(r.name, c.defn.name): c for r in records for c in r.components}
        for key in list(self.escaped):
            comp, w = comps.get(key), workloads.get(key)
            if comp is None or comp.desired_state != RUNNING or (
                    w is not None and w.state == RUNNING):
                del self.escaped[key]
                continue
            try:
                resolve_volumes(parse_volumes(comp.defn.volumes), roots)
            except HostPathError as exc:
                self.escaped[key] = str(exc)
                continue
            except ValidationError:
                continue
            log.info("reconcile: host paths of %s/%s pass again; it may start", *key)
            del self.escaped[key]

    def _event(self, a: Action, detail: str) -> None:
        """What reconcile did, in the event log; not unplanned: the workload's own exit,
        if any, is the monitor's event, and a repair after an agent crash is no crash."""
        try:
            rec = self.host.registry.get_service(a.service)
            state = rec.component(a.component).observed_state
        except MCPError:
            return
        try:
            self.host.registry.record_observed([Event(a.service, a.component, time.time(),
                                                      state, state, detail, unplanned=False)])
        except MCPError:
            log.exception("reconcile: could not record an event")
