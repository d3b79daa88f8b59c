"""rollout.judge and the Rollouts driver, on a dummy store and revert: every order of
health, deadline and revert outcome, without a clock (times are given)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import replace

import pytest
from conftest import until

from mcp_node import rollout
from mcp_node.records import Event
from mcp_node.rollout import (
    FAILED,
    IN_PROGRESS,
    REVERTED,
    REVERTING,
    SUCCEEDED,
    Rollout,
    Rollouts,
    Seen,
    judge,
)

R = Rollout("s", 3, 2, ("web", "db"), started_at=1000.0, min_healthy_s=5, deadline_s=60,
            auto_revert=True)
OK = Seen("running", 5.0, "ok")


def test_succeeds_once_every_changed_component_was_healthy_long_enough() -> None:
    assert judge(R, 1003, {"web": OK, "db": Seen("running", 4.9)}) == (IN_PROGRESS, "")
    assert judge(R, 1006, {"web": OK, "db": OK})[0] == SUCCEEDED
    assert judge(R, 1006, {"web": OK, "db": OK, "other": Seen("stopped", 0)})[0] == SUCCEEDED


def test_healthy_late_but_before_the_deadline_still_succeeds() -> None:
    assert judge(R, 1059.9, {"web": OK, "db": OK})[0] == SUCCEEDED


@pytest.mark.parametrize(("db", "why"), [
    (Seen("backoff", 0, "connection refused"),
     "db is backoff 60 s after the deploy, needs 5 s healthy (last check: connection refused)"),
    (Seen("running", 1.5), "db was healthy for 1.5 s only 60 s after the deploy, needs 5 s "
                           "healthy"),
    (None, "db is gone 60 s after the deploy, needs 5 s healthy"),
])
def test_past_the_deadline_it_fails_naming_the_component(db: Seen | None, why: str) -> None:
    seen = {"web": OK, **({"db": db} if db else {})}
    assert judge(R, 1059, seen) == (IN_PROGRESS, "")
    assert judge(R, 1060, seen) == (FAILED, why)


def test_nothing_changed_succeeds_at_once() -> None:
    assert judge(Rollout("s", 1, None, (), 0, 5, 60, True), 0, {})[0] == SUCCEEDED


class DummyStore:
    def __init__(self, rows: list[Rollout] | None = None) -> None:
        self.rows = {r.service: r for r in rows or []}
        self.events: list[Event] = []

    def put_rollout(self, r: Rollout) -> None:
        self.rows[r.service] = r

    def rollouts(self) -> list[Rollout]:
        return list(self.rows.values())

    def record_events(self, events: list[Event]) -> None:
        self.events.extend(events)


def seen_all(state: str, healthy: float) -> object:
    def seen(service: str, comps: tuple[str, ...]) -> Mapping[str, Seen]:
        return {c: Seen(state, healthy, "refused") for c in comps}
    return seen


def fresh(**kw: object) -> Rollout:
    base = {"started_at": time.time(), "deadline_s": 60.0, "auto_revert": True}
    return Rollout("s", 3, 2, ("web",), min_healthy_s=5,
                   **{**base, **kw})  # type: ignore[arg-type]


def test_a_healthy_rollout_is_stored_succeeded_with_events_and_counts() -> None:
    store = DummyStore()
    rs = Rollouts(store, revert=lambda *a: pytest.fail("no revert"))
    rs.begin(fresh())
    rs.round(seen_all("running", 1.0))       # type: ignore[arg-type]
    assert store.rows["s"].state == IN_PROGRESS
    rs.round(seen_all("running", 5.0))       # type: ignore[arg-type]
    assert store.rows["s"].state == SUCCEEDED and store.rows["s"].ended_at
    assert [(e.component, e.prev_state, e.new_state) for e in store.events] == [
        ("", "", "deploy"), ("", IN_PROGRESS, SUCCEEDED)]
    assert not any(e.unplanned for e in store.events)
    assert rs.counts == {"started": 1, SUCCEEDED: 1, FAILED: 0, REVERTED: 0}


def test_a_failed_rollout_is_reverted_by_the_agent_with_its_reason() -> None:
    store, calls = DummyStore(), []
    rs = Rollouts(store, revert=lambda s, v, why: calls.append((s, v, why)),
                  log_tail=lambda s, c: f"{c}: exit 3")
    rs.begin(fresh(started_at=time.time() - 61))
    rs.round(seen_all("backoff", 0))          # type: ignore[arg-type]
    until(lambda: store.rows["s"].state == REVERTED, 10, "the revert", 0.01)
    [(svc, version, why)] = calls
    assert (svc, version) == ("s", 2)
    assert "web is backoff 60 s after the deploy" in why and "web: exit 3" in why
    assert store.rows["s"].to_dict()["state"] == REVERTED
    assert [e.new_state for e in store.events] == ["deploy", FAILED, REVERTED]
    assert rs.counts[FAILED] == 1 and rs.counts[REVERTED] == 1


def test_without_auto_revert_or_a_previous_version_it_only_fails() -> None:
    for r in (fresh(started_at=0.0, auto_revert=False),
              replace_previous(fresh(started_at=0.0))):
        store = DummyStore()
        rs = Rollouts(store, revert=lambda *a: pytest.fail("no revert"))
        rs.begin(r)
        rs.round(seen_all("unhealthy", 0))      # type: ignore[arg-type]
        assert store.rows["s"].state == FAILED and store.rows["s"].ended_at


def replace_previous(r: Rollout) -> Rollout:
    return replace(r, previous=None)


def test_a_revert_that_fails_leaves_failed_naming_both() -> None:
    store = DummyStore()

    def broken(*_: object) -> None:
        raise RuntimeError("podman is gone")

    rs = Rollouts(store, revert=broken)
    rs.begin(fresh(started_at=0.0))
    rs.round(seen_all("backoff", 0))           # type: ignore[arg-type]
    until(lambda: store.rows["s"].state == FAILED, 10, "the failed revert", 0.01)
    assert store.rows["s"].reason.endswith("the revert to version 2 failed: podman is gone")


def test_a_revert_cut_by_a_crash_is_carried_out_after_a_restart() -> None:
    """A rollout stored as reverting (the agent died mid-revert) is reverted again by the
    next agent's first round; one revert at a time per service."""
    store = DummyStore([replace(fresh(started_at=0.0), state=REVERTING, reason="why")])
    gate, calls = threading.Event(), []

    def slow(s: str, v: int, why: str) -> None:
        calls.append(v)
        gate.wait(10)

    rs = Rollouts(store, revert=slow)
    rs.round(seen_all("running", 0))           # type: ignore[arg-type]
    rs.round(seen_all("running", 0))           # type: ignore[arg-type]
    until(lambda: calls, 10, "the revert began", 0.01)
    gate.set()
    until(lambda: store.rows["s"].state == REVERTED, 10, "the revert", 0.01)
    assert calls == [2]


def test_status_shows_a_revert_under_way_as_failed_and_reverting() -> None:
    d = replace(R, state=REVERTING, reason="x").to_dict()
    assert (d["state"], d["reverting"], d["version"], d["previous"]) == (FAILED, True, 3, 2)
    assert rollout.OUTCOMES == ("started", SUCCEEDED, FAILED, REVERTED)


def test_the_registry_keeps_rollouts_and_service_events(tmp_path: object) -> None:
    """Rollouts survive a reopen (a restarted agent judges on), go with an undeploy, and a
    service's events (component "", rollout words for states) read back as written."""
    from pathlib import Path

    from mcp_node.registry import Registry
    from mcp_node.servicedef import from_dict

    db = Path(str(tmp_path)) / "registry.db"
    reg = Registry(db)
    reg.put_service(from_dict({"name": "s", "components": [
        {"name": "web", "image": "localhost/x:1"}]}))
    r = replace(R, state=REVERTING, reason="web is backoff")
    reg.put_rollout(r)
    reg.put_rollout(replace(r, service="gone"))      # no such service: not kept
    reg.record_events([Event("s", "", 5.0, IN_PROGRESS, FAILED, "version 3: why",
                             unplanned=False)])
    reg.close()
    reg = Registry(db)
    assert reg.rollouts() == [r]
    [e] = reg.events("s")
    assert (e.component, e.prev_state, e.new_state, e.detail, e.unplanned) == (
        "", IN_PROGRESS, FAILED, "version 3: why", False)
    assert reg.event_counts(0) == {}                 # not a flap
    v = reg.record_deployment(from_dict({"name": "s", "components": [
        {"name": "web", "image": "localhost/x:1"}]}), note="reverted from version 3")
    assert reg.history("s")[-1].note == "reverted from version 3" and v == 1
    reg.delete_service("s")
    assert reg.rollouts() == []
    reg.close()
