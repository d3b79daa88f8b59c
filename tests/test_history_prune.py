"""History of undeployed services is bounded (issue 16): pruned by age and by count, with
time injected, while a deployed service's history stays; undeploy and monitor rounds
prune; migration 011 dates history kept from before it."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import ValidationError
from mcp_node.records import definition_digest
from mcp_node.registry import Registry
from mcp_node.servicedef import from_dict

DAY = 86400.0


def svc(name: str, version: int = 1, env_kb: int = 0) -> Any:
    return from_dict({"name": name, "components": [{
        "name": "web", "image": f"localhost/x:v{version}",
        "env": [f"BIG{i}={'x' * 1000}" for i in range(env_kb)]}]})


def deploy(reg: Registry, name: str, versions: int = 3) -> None:
    for v in range(1, versions + 1):
        reg.put_service(svc(name, v))
        reg.record_deployment(svc(name, v))


def rows(reg: Registry) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reg._query("SELECT service FROM deployments"):
        out[r[0]] = out.get(r[0], 0) + 1
    return out


def test_undeployed_history_is_pruned_by_count_and_age(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    t0 = 1_000_000.0
    deploy(reg, "live")
    for i in range(10):
        deploy(reg, f"gone{i}")
        reg.delete_service(f"gone{i}", now=t0 + i * DAY)    # gone0 first, gone9 last
    # the defect: without pruning, all of it stays for ever
    assert rows(reg) == {"live": 3, **{f"gone{i}": 3 for i in range(10)}}
    # by count: the 4 most recently undeployed stay
    assert reg.prune_history(365 * DAY, 4, now=t0 + 10 * DAY) == [f"gone{i}" for i in
                                                                 range(5, -1, -1)]
    assert rows(reg) == {"live": 3, "gone9": 3, "gone8": 3, "gone7": 3, "gone6": 3}
    # by age: undeployed more than 2.5 days before now (gone6 at day 6, gone7 at day 7)
    assert reg.prune_history(2.5 * DAY, 100, now=t0 + 9.6 * DAY) == ["gone7", "gone6"]
    assert rows(reg) == {"live": 3, "gone9": 3, "gone8": 3}
    # keep nothing undeployed: a deployed service is still never pruned
    assert reg.prune_history(0, 0, now=t0 + 8.5 * DAY) == ["gone9", "gone8"]
    assert rows(reg) == {"live": 3}
    assert reg.prune_history(0, 0, now=t0 + 1000 * DAY) == []
    assert [d.version for d in reg.history("live")] == [1, 2, 3]
    reg.close()


def test_a_redeployed_service_keeps_its_history(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    deploy(reg, "back")
    reg.delete_service("back", now=1.0)
    reg.put_service(svc("back", 4))           # deployed again: no longer undeployed
    reg.record_deployment(svc("back", 4))
    assert reg.prune_history(0, 0, now=10 * DAY) == []
    assert [d.version for d in reg.history("back")] == [1, 2, 3, 4]
    reg.delete_service("back", now=20 * DAY)  # undeployed again: dated from now
    assert reg.prune_history(DAY, 10, now=20.5 * DAY) == []
    assert reg.prune_history(DAY, 10, now=21.5 * DAY) == ["back"]
    assert reg.history("back") == []
    reg.close()


def test_migration_dates_history_kept_before_it(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    old = Registry(path, migrate_to=10)
    for name in ("kept", "gone"):   # written as release 10 would (today's writes need
        for v in (1, 2, 3):         # columns of later migrations)
            d = svc(name, v)
            old._db.execute("INSERT INTO deployments (service, version, time, digest, "
                            "definition) VALUES (?,?,?,?,?)",
                            (name, v, time.time() + v / 1000, definition_digest(d),
                             json.dumps(d.to_dict(), sort_keys=True)))
    old._db.execute("INSERT INTO services (name, active, created_at, updated_at) "
                    "VALUES ('kept', 1, 'then', 'then')")   # 'gone' was undeployed
    last = old._db.execute("SELECT MAX(time) FROM deployments WHERE service='gone'"
                           ).fetchone()[0]
    old.close()
    reg = Registry(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT service, time FROM undeployed").fetchall() == [("gone", last)]
    db.close()
    assert reg.prune_history(0, 100, now=last + 1) == ["gone"]
    assert set(rows(reg)) == {"kept"}
    reg.close()


def test_undeploy_and_rounds_prune_with_the_config(tmp_path: Path) -> None:
    world = FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                            "history": {"max_undeployed_services": 2}})
    agent = Agent(cfg, runtimes=world.runtimes())
    try:
        agent.deploy(svc("live", env_kb=64))
        for i in range(4):
            for v in (1, 2, 3):
                agent.deploy(svc(f"s{i}", v, env_kb=64))   # env values are in the history
            agent.undeploy(f"s{i}")
        assert rows(agent.registry) == {"live": 1, "s3": 3, "s2": 3}
        # a round prunes by age (history.* is read at use time)
        agent.registry.delete_service("s2", now=1.0)        # as if undeployed long ago
        agent.monitor.refresh()
        assert rows(agent.registry) == {"live": 1, "s3": 3}
    finally:
        agent.close()


@pytest.mark.parametrize(("key", "value"), [("keep_undeployed_days", -1),
                                            ("max_undeployed_services", -1),
                                            ("keep_undeployed_days", 1e9)])
def test_history_keys_have_ranges(key: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"history.{key}"):
        config_from_dict({"history": {key: value}})


def test_check_config_names_the_history_keys(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mcp_node.agent_cli import main
    from mcp_node.daemon import is_live

    assert is_live("history.keep_undeployed_days") and is_live("history.max_undeployed_services")

    conf = tmp_path / "agent.toml"
    conf.write_text('[history]\nkeep_undeployed_days = -1\nmax_undeployed_services = "x"\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1
    assert sorted(ln.split(": ")[1] for ln in res.stderr.splitlines()[:-1]) == [
        "history.keep_undeployed_days", "history.max_undeployed_services"]
    conf.write_text('[history]\nkeep_undeployed_days = 0.5\n')
    res = CliRunner().invoke(main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 0, res.output
