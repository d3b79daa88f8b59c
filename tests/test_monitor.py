"""The monitor's pure comparison: events, planned vs unplanned changes, orphans."""

from __future__ import annotations

from mcp_node.monitor import is_drift, observe
from mcp_node.records import ComponentRecord, ServiceRecord
from mcp_node.runtime import Workload
from mcp_node.servicedef import ComponentDef


def rec(desired: str, observed: str) -> ServiceRecord:
    comp = ComponentRecord(ComponentDef(name="web", image="i"), desired_state=desired,
                           observed_state=observed)
    return ServiceRecord(name="s", active=True, components=[comp])


def w(state: str, restarts: int = 0, service: str = "s") -> Workload:
    return Workload(service, "web", "container", state, restart_count=restarts)


def test_is_drift() -> None:
    assert is_drift("running", "stopped") and is_drift("running", "missing")
    assert is_drift("stopped", "running")
    assert not is_drift("running", "running") and not is_drift("stopped", "missing")
    assert not is_drift("running", "unknown")


def test_reaching_the_desired_state_is_planned_leaving_it_is_not() -> None:
    _, _, [up] = observe([rec("running", "unknown")], {"container": [w("running")]}, {}, {}, 1.0)
    assert (up.prev_state, up.new_state, up.unplanned) == ("unknown", "running", False)
    _, _, [down] = observe([rec("running", "running")], {"container": [w("stopped")]}, {}, {},
                           2.0)
    assert down.unplanned is True
    _, _, [stopped] = observe([rec("stopped", "running")], {"container": []}, {}, {}, 3.0)
    assert (stopped.new_state, stopped.unplanned) == ("missing", False)


def test_runtime_restarts_are_unplanned_events() -> None:
    restarts: dict[tuple[str, str], int] = {}
    observe([rec("running", "running")], {"container": [w("running", 1)]}, {}, restarts, 1.0)
    _, _, [ev] = observe([rec("running", "running")], {"container": [w("running", 3)]}, {},
                         restarts, 2.0)
    assert ev.unplanned and "restarted" in ev.detail


def test_unlistable_runtime_invents_nothing_and_orphans_are_kept() -> None:
    assert observe([rec("running", "running")], {}, {"container": "down"}, {}, 1.0)[2] == []
    by_key, orphans, _ = observe([rec("running", "running")],
                                 {"container": [w("running"), w("running", service="x")]},
                                 {}, {}, 1.0)
    assert list(by_key) == [("s", "web")] and [o.service for o in orphans] == ["x"]
