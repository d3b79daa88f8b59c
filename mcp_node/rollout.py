"""Health-gated rollouts (issue 19): a deploy that changes components has succeeded
only once every changed component passed its check and stayed healthy for
``min_healthy_s``, within ``healthy_deadline_s`` of the deploy; otherwise it failed, and
with ``auto_revert`` the agent deploys the version before it again by itself.

``judge`` is the decision, pure, so every order of events is tested without a clock.
``Rollouts`` keeps each service's rollout in the registry (a restarted agent goes on
judging it, and finishes a revert a crash cut), feeds ``judge`` once per monitor round,
and carries out what it says. Only the changed components are waited for, and a
revert goes through the ordinary deploy, which leaves unchanged components alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .errors import MCPError
from .plan import plan
from .records import Event, definition_digest
from .safetext import escape_controls
from .servicedef import ServiceDef

log = logging.getLogger("mcp_node.rollout")

IN_PROGRESS, SUCCEEDED, FAILED = "in_progress", "succeeded", "failed"
REVERTING, REVERTED = "reverting", "reverted"
OUTCOMES = ("started", SUCCEEDED, FAILED, REVERTED)   # the metric's closed label set


@dataclass(frozen=True)
class Rollout:
    service: str
    version: int
    previous: int | None             # the version a revert deploys; None: the first
    components: tuple[str, ...]      # the changed ones, which must become healthy
    started_at: float                # unix time of the deploy
    min_healthy_s: float
    deadline_s: float                # healthy_deadline_s, at least min_healthy_s
    auto_revert: bool
    state: str = IN_PROGRESS
    reason: str = ""
    ended_at: float | None = None
    calm_at: float | None = None     # when what runs was healthy min_healthy_s: flaps
                                     # before it no longer count

    def to_dict(self) -> dict[str, Any]:
        """As ``status`` shows it (design §10: version, state, reason); a failed one whose
        revert is under way is ``failed`` with ``reverting`` true."""
        return {"version": self.version,
                "state": FAILED if self.state == REVERTING else self.state,
                "reverting": self.state == REVERTING, "reason": self.reason,
                "components": list(self.components), "previous": self.previous}


@dataclass(frozen=True)
class Seen:
    """A changed component as this round sees it."""

    state: str                       # as ps shows it: running, starting, unhealthy, ...
    healthy_for: float               # seconds its check has passed without a break
    check: str = ""                  # the last check result, for a failure's reason


def judge(r: Rollout, now: float, seen: Mapping[str, Seen]) -> tuple[str, str]:
    """(state, reason) of an in-progress rollout now."""
    waiting = [c for c in r.components
               if c not in seen or seen[c].state != "running"
               or seen[c].healthy_for < r.min_healthy_s]
    if not waiting:
        return SUCCEEDED, (f"every changed component healthy for {r.min_healthy_s:g} s"
                           if r.components else "nothing changed")
    if now - r.started_at < r.deadline_s:
        return IN_PROGRESS, ""
    c = waiting[0]
    s = seen.get(c)
    if s is None:
        why = "is gone"
    elif s.state != "running":
        why = f"is {s.state}"
    else:
        why = f"was healthy for {s.healthy_for:.1f} s only"
    check = f" (last check: {s.check})" if s is not None and s.check else ""
    return FAILED, (f"{c} {why} {r.deadline_s:g} s after the deploy, needs "
                    f"{r.min_healthy_s:g} s healthy{check}")


def changed_components(previous: ServiceDef | None, new: ServiceDef,
                       states: Mapping[str, str]) -> tuple[str, ...]:
    """What a deploy of ``new`` over ``previous`` creates, replaces or starts: the
    components its rollout waits for (those it leaves alone are never touched)."""
    return tuple(ch.component for ch in plan(previous, new, dict(states)).changes
                 if ch.action in ("create", "replace", "start"))


def new_rollout(defn: ServiceDef, version: int, previous: int | None,
                changed: tuple[str, ...], now: float) -> Rollout:
    u = defn.update
    return Rollout(defn.name, version, previous, changed, now, u.min_healthy_s,
                   max(u.healthy_deadline_s, u.min_healthy_s), u.auto_revert)


class Host(Protocol):
    """What the agent side of a rollout uses: its history, deploy and logs."""

    def rollback_definition(self, name: str, version: int | None = None) -> ServiceDef: ...

    def deploy_local(self, defn: ServiceDef, *, note: str = "",
                     gated: bool = True) -> dict[str, Any]: ...

    def logs(self, name: str, component: str | None, tail: int | None,
             follow: bool) -> Iterator[bytes]: ...


def reverter(host: Host) -> Callable[[str, int, str], None]:
    """A failed rollout's revert: ``version`` deployed again through the ordinary
    deploy (its unchanged components left alone), not gated again."""
    def revert(service: str, version: int, reason: str) -> None:
        host.deploy_local(host.rollback_definition(service, version),
                          note=f"reverted by the agent: {reason}", gated=False)
    return revert


def last_output(host: Host, lines: int = 5) -> Callable[[str, str], str]:
    """A failing component's last lines, for a rollout's reason ("" if none)."""
    def tail(service: str, component: str) -> str:
        try:
            text = b"".join(host.logs(service, component, lines, False)).decode(
                errors="replace")
        except MCPError:
            return ""
        kept = [escape_controls(x.strip()) for x in text.splitlines() if x.strip()]
        return " | ".join(kept)[-400:]
    return tail


INTERRUPTED = "recorded at the agent's start: the deploy was cut short by its death"


class Store(Protocol):
    """Where rollouts are kept (the registry)."""

    def put_rollout(self, r: Rollout) -> None: ...

    def rollouts(self) -> list[Rollout]: ...

    def record_events(self, events: list[Event]) -> None: ...

    def list_services(self) -> list[Any]: ...

    def history(self, service: str) -> list[Any]: ...

    def record_deployment(self, svc: ServiceDef, keep: int = ..., note: str = "") -> int: ...


class Rollouts:
    """The agent's rollouts: begun by a deploy, judged each monitor round, reverted by
    ``revert(service, version, reason)`` (the agent's deploy of that version) on a
    thread of its own, so a round never waits for a deploy."""

    def __init__(self, store: Store, revert: Callable[[str, int, str], None],
                 log_tail: Callable[[str, str], str] = lambda s, c: "") -> None:
        self.store, self._revert, self._log_tail = store, revert, log_tail
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()
        self._reverting: set[str] = set()
        self._by_service = {r.service: r for r in store.rollouts()}

    def begin(self, r: Rollout) -> None:
        with self._lock:
            self.store.put_rollout(r)
            self._by_service[r.service] = r
            self.counts["started"] += 1
        self._event(r, "", "deploy", f"version {r.version}: "
                    + (", ".join(r.components) or "nothing") + " changed")

    def resume_interrupted(self) -> list[str]:
        """A deploy the agent's death cut short: its record is written before its
        workloads run (a start-first replace keeps the old one serving through its check
        and drain), its version and rollout only once they ran. So a restarted agent
        finds a record no version in history matches, which reconcile makes the
        runtimes run. It is recorded here as the version it is (noted) and its rollout
        begun, the changed components those of the version before: history marks what
        runs current, status shows its rollout, and a bad release is judged and
        reverted as if the deploy had ended. Returns the services so resumed."""
        out = []
        for rec in self.store.list_services():
            if rec.undeploying:
                continue
            defn = rec.definition()
            rows = self.store.history(rec.name)
            if any(r.digest == definition_digest(defn) for r in rows):
                continue
            before = rows[-1] if rows else None
            changed = changed_components(
                before.definition if before else None, defn,
                {c.defn.name: c.observed_state for c in rec.components})
            version = self.store.record_deployment(defn, note=INTERRUPTED)
            if defn.active and changed:
                self.begin(new_rollout(defn, version, before.version if before else None,
                                       changed, time.time()))
            log.warning("rollout: service=%s: its deploy was cut short by the agent's "
                        "death; its record is version %d now, its rollout begun (%s "
                        "changed)", rec.name, version, ", ".join(changed) or "nothing")
            out.append(rec.name)
        return out

    def of(self, service: str) -> Rollout | None:
        return self._by_service.get(service)

    def latest(self) -> list[Rollout]:
        """Each service's latest rollout."""
        return list(self._by_service.values())

    def calm_since(self) -> dict[str, float]:
        """Service -> when what it runs was last judged healthy for min_healthy_s after a
        rollout: the monitor counts flaps only after that (issue 19: a service stayed
        FLAPPING for the whole window after a good revert)."""
        return {s: r.calm_at for s, r in self._by_service.items() if r.calm_at is not None}

    def forget(self, service: str) -> None:
        """Its service was undeployed (the registry row went with it)."""
        with self._lock:
            self._by_service.pop(service, None)

    def round(self, seen: Callable[[str, tuple[str, ...]], Mapping[str, Seen]]) -> None:
        """Judge every rollout still going on; ``seen(service, components)``."""
        now = time.time()
        for r in list(self._by_service.values()):
            if r.state == REVERTING:
                self._start_revert(r)
                continue
            if r.state == REVERTED and r.calm_at is None:   # the old version healthy again
                if judge(replace(r, started_at=now), now,
                         seen(r.service, r.components))[0] == SUCCEEDED:
                    self._put(replace(r, calm_at=now))
                continue
            if r.state != IN_PROGRESS:
                continue
            state, reason = judge(r, now, seen(r.service, r.components))
            if state == IN_PROGRESS:
                continue
            if state == FAILED and r.components:
                tail = self._log_tail(r.service, reason.split(" ", 1)[0])
                if tail:
                    reason += f"; its last output: {tail}"
            revert = state == FAILED and r.auto_revert and r.previous is not None
            done = replace(r, state=REVERTING if revert else state, reason=reason,
                           ended_at=None if revert else now,
                           calm_at=now if state == SUCCEEDED else None)
            self._put(done)
            self.counts[FAILED if revert else state] += 1
            self._event(done, IN_PROGRESS, FAILED if revert else state,
                        f"version {r.version}: {reason}")
            if revert:
                self._start_revert(done)

    def _start_revert(self, r: Rollout) -> None:
        with self._lock:
            if r.service in self._reverting:
                return
            self._reverting.add(r.service)
        threading.Thread(target=self._run_revert, args=(r,), name=f"mcp-revert-{r.service}",
                         daemon=True).start()

    def _run_revert(self, r: Rollout) -> None:
        assert r.previous is not None
        try:
            self._revert(r.service, r.previous, r.reason)
        except Exception as exc:  # noqa: BLE001 - recorded: the operator acts
            log.exception("rollout: revert of %s to version %d failed", r.service, r.previous)
            done = replace(r, state=FAILED, ended_at=time.time(),
                           reason=f"{r.reason}; the revert to version {r.previous} "
                                  f"failed: {exc}")
        else:
            done = replace(r, state=REVERTED, ended_at=time.time())
            with self._lock:
                self.counts[REVERTED] += 1
            self._event(done, FAILED, REVERTED, f"version {r.version} -> {r.previous}: "
                        f"{r.reason}")
        finally:
            with self._lock:
                self._reverting.discard(r.service)
        cur = self._by_service.get(r.service)
        if cur is not None and cur.version == r.version and cur.state == REVERTING:
            self._put(done)     # (not if a deploy meanwhile began a rollout of its own)

    def _put(self, r: Rollout) -> None:
        with self._lock:
            self.store.put_rollout(r)
            self._by_service[r.service] = r

    def _event(self, r: Rollout, prev: str, new: str, detail: str) -> None:
        log.info("rollout service=%s %s->%s %s", r.service, prev or "-", new, detail)
        self.store.record_events([Event(r.service, "", time.time(), prev, new, detail,
                                        unplanned=False)])
