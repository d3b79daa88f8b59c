"""Interrupted operations in reconcile's plan and the registry (issue 18), pure logic and
SQLite: an undeploy's intent (``undeploying``, migration 012) makes one action that
finishes it, and a workload whose process lives with its guest paused is resumed
whatever its restart policy. The real-process faults are in test_crash_interrupted.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mcp_node.agent import Agent
from mcp_node.errors import NotFoundError
from mcp_node.reconcile import Action, Backoff, Policy, plan, still_wanted
from mcp_node.records import ServiceRecord
from mcp_node.registry import Registry
from mcp_node.runtime import RUNTIME_NAMES, Workload
from mcp_node.servicedef import from_dict
from mcp_node.states import RUNNING, STOPPED

CONTAINER, VM = RUNTIME_NAMES


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.db")


def put(reg: Registry, name: str, restart: str = "") -> ServiceRecord:
    return reg.put_service(from_dict({"name": name, "components": [
        {"name": "web", "image": "img:v1", "restart": restart},
        {"name": "vm", "image": "img:v1", "runtime": VM, "memory_mb": 128,
         "restart": restart}]}))


def digest(rec: ServiceRecord, comp: object) -> str:
    return Agent.plain_spec(rec.name, comp).digest


def workload(rec: ServiceRecord, comp: str, state: str = RUNNING, paused: str = "",
             spec: bool = True) -> Workload:
    c = rec.component(comp)
    return Workload(rec.name, comp, c.defn.runtime, state,  # type: ignore[arg-type]
                    spec_digest=digest(rec, c) if spec else "0" * 16, paused=paused)


def actions(records: list[ServiceRecord], ws: list[Workload],
            skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    out = plan(records, {(w.service, w.component): w for w in ws}, [], digest,
               {}, 0.0, Policy(), skip)
    return [(a.kind, a.service, a.component) for a in out.actions]


def test_mark_undeploying_records_the_intent_in_one_step(reg: Registry) -> None:
    put(reg, "s")
    reg.mark_undeploying("s")
    rec = reg.get_service("s")
    assert rec.undeploying and not rec.active
    assert {c.desired_state for c in rec.components} == {STOPPED}
    with pytest.raises(NotFoundError):
        reg.mark_undeploying("nope")
    # A deploy of the name is the newer intent: it clears the mark.
    assert not put(reg, "s").undeploying and put(reg, "s").active


def test_migration_012_adds_the_mark_cleared_on_kept_services(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    Registry(path, migrate_to=11).close()
    db = sqlite3.connect(path)   # a row as release 11 wrote it
    db.execute("INSERT INTO services (name, active, created_at, updated_at) "
               "VALUES ('kept', 1, 'then', 'then')")
    db.commit()
    db.close()
    reg = Registry(path)
    assert reg.schema_version() >= 12
    assert reg.get_service("kept").undeploying is False
    reg.close()
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(services)")]
    assert "undeploying" in cols


def test_an_interrupted_undeploy_is_one_action_that_finishes_it(reg: Registry) -> None:
    put(reg, "s")
    put(reg, "other")
    reg.mark_undeploying("s")
    s, other = reg.get_service("s"), reg.get_service("other")
    # half-done: web removed (missing), vm left exited; nothing of "other" touched
    ws = [workload(s, "vm", STOPPED), workload(other, "web"), workload(other, "vm")]
    assert actions([other, s], ws) == [("undeploy", "s", "")]
    assert actions([s], []) == [("undeploy", "s", "")]    # all gone: the record still goes
    # a runtime that could not be listed: cannot tell what is left, so wait
    assert actions([s], ws, skip=(VM,)) == []
    a = Action("undeploy", "s", "", "", "undeploy interrupted")
    assert still_wanted(a, s, None, digest)
    assert not still_wanted(a, other, None, digest)   # a deploy came first: its record
    assert not still_wanted(a, None, None, digest)


@pytest.mark.parametrize("restart", ["", "no", "on-failure"])
def test_a_paused_guest_is_resumed_whatever_its_restart_policy(reg: Registry,
                                                               restart: str) -> None:
    rec = put(reg, "p", restart)
    ws = [workload(rec, "web"), workload(rec, "vm", STOPPED, "prelaunch")]
    assert actions([rec], ws) == [("resume", "p", "vm")]
    a = Action("resume", "p", "vm", VM, "found prelaunch")
    assert still_wanted(a, rec, ws[1], digest)
    assert not still_wanted(a, rec, workload(rec, "vm"), digest)   # runs by now
    # an exited one under restart = "no" stays down: resuming is not restarting
    exited = [workload(rec, "web"), workload(rec, "vm", STOPPED)]
    b: dict[tuple[str, str], Backoff] = {}
    out = plan([rec], {(w.service, w.component): w for w in exited}, [], digest, b, 0.0,
               Policy())
    assert bool(out.held) == (restart == "no")


def test_a_paused_guest_made_from_another_spec_is_replaced(reg: Registry) -> None:
    rec = put(reg, "p")
    ws = [workload(rec, "web"), workload(rec, "vm", STOPPED, "prelaunch", spec=False)]
    assert actions([rec], ws) == [("run", "p", "vm")]


def test_a_paused_guest_desired_stopped_is_stopped(reg: Registry) -> None:
    put(reg, "p")
    reg.set_desired("p", STOPPED)
    rec = reg.get_service("p")
    ws = [workload(rec, "web", STOPPED), workload(rec, "vm", STOPPED, "paused")]
    assert actions([rec], ws) == [("stop", "p", "vm")]
    a = Action("stop", "p", "vm", VM, "desired stopped")
    assert still_wanted(a, rec, ws[1], digest)
    assert not still_wanted(a, rec, workload(rec, "vm", STOPPED), digest)
