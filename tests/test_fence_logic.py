"""Pure rules of self-fencing (issue 18): the deadline arithmetic, the lease guard's
states (no start before the first sync under a lease, a fired fence never revived by
a leaderless etcd, an expiry fences at once, a revoking stop fences within the
grace), the heartbeat file, and the ``failover`` key of a definition. The real
processes, faults and podman are in tests/test_fence_faults.py."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from mcp_node import fence
from mcp_node.cluster import Traffic
from mcp_node.config import ClusterConfig
from mcp_node.errors import ValidationError
from mcp_node.fleetlease import LeaseGuard
from mcp_node.servicedef import from_dict


def guard(tmp_path: Path, ttl: int = 2) -> LeaseGuard:
    cfg = ClusterConfig(etcd=("http://127.0.0.1:9",), lease_ttl_s=ttl, timeout_s=0.2)
    return LeaseGuard(cfg, tmp_path, Traffic(), lambda: ("owner1", "", ["local"]),
                      lambda: None)


def test_deadline_is_before_the_expiry_by_the_margins() -> None:
    for ttl in (2, 10, 60):
        at = fence.fence_at(100.0, ttl)
        assert at < 100.0 + ttl * (1 - fence.RATE_MARGIN)
        assert 100.0 + ttl - at >= fence.margin_s(ttl) >= 0.4
        assert at > 100.0


def test_nothing_fleet_placed_starts_before_the_sync_under_the_lease(tmp_path: Path) -> None:
    g = guard(tmp_path)
    now = time.monotonic()
    g.granted(7, now)
    assert not g.may_run()                       # joined, not yet synced
    assert fence.read_beat(tmp_path) is None     # the fence is not re-armed either
    g.synced_under(6)                            # a sync under an older lease: no
    assert not g.may_run()
    g.synced_under(7)
    assert g.may_run()
    beat = fence.read_beat(tmp_path)
    assert beat is not None and beat.deadline == pytest.approx(fence.fence_at(now, 2))
    assert beat.owner == "owner1" and beat.exempt == ["local"]
    assert stat.S_IMODE((tmp_path / fence.BEAT).stat().st_mode) == 0o600


def test_no_leader_extends_only_a_lease_surely_alive(tmp_path: Path) -> None:
    g = guard(tmp_path)
    g.granted(7, time.monotonic() - 10)          # renewed 10 s ago: long past
    g.synced_under(7)
    assert not g.may_run()
    now = time.monotonic()
    g._hold(now, now)         # no leader now, but the lease may have expired: stays fenced
    assert not g.may_run()
    (tmp_path / "a").mkdir()
    g1 = guard(tmp_path / "a")
    g1.granted(5, time.monotonic() - 1.7)        # fenced (1.56 s) but not yet expirable (1.96)
    g1.synced_under(5)
    assert not g1.may_run()
    now = time.monotonic()
    g1._hold(now, now)
    assert g1.may_run()                          # no leader while surely alive: held
    (tmp_path / "b").mkdir()
    g2 = guard(tmp_path / "b")
    g2.granted(8, time.monotonic())
    g2.synced_under(8)
    before = g2.deadline
    later = time.monotonic() + 0.5
    g2._hold(later, time.monotonic())            # still alive: no leader extends it
    assert g2.deadline == pytest.approx(fence.fence_at(later, 2)) and g2.deadline > before


def test_a_revoking_stop_fences_within_the_grace(tmp_path: Path) -> None:
    g = guard(tmp_path)
    g.granted(7, time.monotonic())
    g.synced_under(7)
    g.release(grace=0.0, revoking=True)          # the work may move at once: fence now
    beat = fence.read_beat(tmp_path)
    assert beat is not None and beat.deadline <= time.monotonic()
    (tmp_path / "keep").mkdir()
    g2 = guard(tmp_path / "keep")
    g2.granted(9, time.monotonic())
    g2.synced_under(9)
    d = g2.deadline
    g2.release(grace=30.0, revoking=False)       # a crash-like stop: the deadline stands
    assert g2.deadline == d


def test_beat_round_trip_and_a_torn_file(tmp_path: Path) -> None:
    b = fence.Beat(deadline=12.5, owner="o", ttl=2, podman="unix:///x", exempt=["a"])
    fence.write_beat(tmp_path, b)
    assert fence.read_beat(tmp_path) == b
    (tmp_path / fence.BEAT).write_text('{"deadline": ')
    assert fence.read_beat(tmp_path) is None
    assert not fence.fence_running(tmp_path) and fence.fence_pid(tmp_path) is None


def test_failover_key() -> None:
    base = {"name": "web", "components": [{"name": "web", "image": "img:v1"}]}
    assert from_dict(base).failover == ""
    assert "failover" not in from_dict(base).to_dict()
    d = from_dict({**base, "failover": "overlap"})
    assert d.failover == "overlap" and d.to_dict()["failover"] == "overlap"
    assert d.local_part().failover == ""          # a node's registry keeps no fleet key
    for bad in ("twice", 1, ["overlap"], None):
        with pytest.raises(ValidationError) as exc:
            from_dict({**base, "failover": bad})
        assert exc.value.field == "failover"


def test_fence_facts_name_the_podman_socket_and_spare_local_and_overlap(tmp_path: Path) -> None:
    from fake_runtime import FakeWorld

    from mcp_node.agent import Agent
    from mcp_node.config import from_dict as config_from_dict
    from mcp_node.fleetlease import fence_facts

    cfg = config_from_dict({"state": {"dir": str(tmp_path)},
                            "podman": {"socket": "/run/x/podman.sock"}})
    agent = Agent(cfg, runtimes=FakeWorld().runtimes())
    try:
        for name in ("local1", "fleet1", "ov"):
            agent.deploy_local(from_dict({"name": name, "components": [
                {"name": "web", "image": "img:v1"}]}))
        owner, url, exempt = fence_facts(agent, {"fleet1", "ov"}, {"ov"})
        assert owner == agent.owner
        assert url == "unix:///run/x/podman.sock"       # the fakes have no socket of theirs
        assert exempt == ["local1", "ov"]                # fleet1 is fenced
    finally:
        agent.close()
