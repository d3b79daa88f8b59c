"""Fleet secrets (issue 20, item 4) on an in-memory etcd: ``mcp secret set/list/rm`` in
fleet mode seal under the fleet key into etcd; a deploy pins versions and the placed
node opens them before it changes anything, or says which node, which secret and why
(no key, another key, an altered record, a missing version); ``rm`` is refused while
any service uses the secret, and neither ``rm`` nor a deploy can race past the other.
No value is in etcd, an answer or a log line in clear. Real agents and etcd:
tests/test_fleet_secrets_live.py."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_etcd import FakeEtcd
from fake_runtime import FakeWorld

from mcp_node.agent_cli import main as agent_main
from mcp_node.cluster import SECRETS, SERVICES
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import (
    ConflictError,
    NotFoundError,
    SecretStoreError,
    ValidationError,
    WorkloadError,
)
from mcp_node.fleetnode import Fleet
from mcp_node.fleetops import FleetOperations
from mcp_node.fleetsecrets import check_key_file
from mcp_node.secretstore import write_key
from mcp_node.servicedef import from_dict
from mcp_node.wiring import node_agent

VALUE = b"Fz9-fleet-" + os.urandom(6).hex().encode()
KEY = os.urandom(32)


def defn(node: str = "", name: str = "app") -> Any:
    d: dict[str, Any] = {"name": name, "components": [
        {"name": "web", "image": "img:v1", "secrets": ["db"], "env": ["DB=secret:db"]}]}
    if node:
        d["node"] = node
    return from_dict(d)


def _key_file(path: Path, key: bytes) -> str:
    write_key(path, key, exclusive=True)
    return str(path)


@pytest.fixture
def etcd() -> FakeEtcd:
    return FakeEtcd()


def make_fleet(tmp_path: Path, etcd: FakeEtcd, keys: dict[str, bytes | None]
               ) -> dict[str, FleetOperations]:
    """Agents on ``etcd`` with fake runtimes, each given ``keys[name]`` as its fleet key
    (None: none). A deploy's wait lets the placed node follow first (no threads here)."""
    agents: dict[str, FleetOperations] = {}
    for name, key in keys.items():
        secrets = {"fleet_key_file": _key_file(tmp_path / f"{name}.key", key)} if key else {}
        cfg = config_from_dict({"state": {"dir": str(tmp_path / name)}, "secrets": secrets,
                                "cluster": {"etcd": ["http://127.0.0.1:9"], "node": name,
                                            "memory_mb": 1000, "deploy_wait_s": 5}})
        a = FleetOperations(node_agent(cfg, runtimes=FakeWorld().runtimes()))
        a.fleet.etcd = etcd  # type: ignore[assignment]
        a.fleet._join()
        agents[name] = a

    def waits(f: Fleet) -> Any:
        def wait(name: str, node: str, gen: int) -> dict[str, Any]:
            agents[node].fleet.sync()
            return Fleet._await(f, name, node, gen)
        return wait

    for a in agents.values():
        a.fleet._await = waits(a.fleet)  # type: ignore[method-assign]
    return agents


@pytest.fixture
def fleet(tmp_path: Path, etcd: FakeEtcd) -> Iterator[dict[str, FleetOperations]]:
    agents = make_fleet(tmp_path, etcd, {"c1": KEY, "c2": KEY})
    try:
        yield agents
    finally:
        for a in agents.values():
            a.close()


def raw_etcd(etcd: FakeEtcd) -> str:
    return json.dumps({k: kv.value for k, kv in etcd.kv.items()})


def test_set_list_rm_in_etcd_sealed(fleet: dict[str, FleetOperations], etcd: FakeEtcd,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c1, c2 = fleet["c1"], fleet["c2"]
    answers: list[Any] = [c1.secret_set("db", VALUE)]
    assert answers[0]["name"] == "db" and answers[0]["version"] == 1
    assert answers[0]["used_by"] == []
    kv = etcd.get(SECRETS + "db")
    assert kv is not None and set(kv.value["versions"]["1"]) == {
        "created", "key_id", "nonce", "ciphertext"}
    for v in range(2, 6):                                  # any member with the key writes
        answers.append(c2.secret_set("db", VALUE + str(v).encode()))
    listed = c1.secret_list()
    answers.append(listed)
    assert [(s["name"], s["version"], s["versions"]) for s in listed] == \
        [("db", 5, [3, 4, 5])]                            # the newest 3 kept
    assert listed[0]["created"] <= listed[0]["updated"]
    c2.secret_remove("db")
    assert etcd.get(SECRETS + "db") is None and c1.secret_list() == []
    with pytest.raises(NotFoundError, match="no secret 'db' in the fleet"):
        c1.secret_remove("db")
    with pytest.raises(ValidationError, match="not a valid secret name"):
        c1.secret_set("Bad!", VALUE)
    blob = json.dumps(answers) + raw_etcd(etcd) + caplog.text
    assert VALUE.decode() not in blob and base64.b64encode(VALUE).decode() not in blob
    assert "fleet: secret set name=db version=1" in caplog.text


def test_deploy_pins_versions_plan_shows_a_new_one_and_rm_is_refused(
        fleet: dict[str, FleetOperations], etcd: FakeEtcd) -> None:
    c1, c2 = fleet["c1"], fleet["c2"]
    with pytest.raises(ValidationError) as exc:
        c1.deploy(defn("c2"))
    assert str(exc.value) == ("components[0].secrets: secret 'db' is not set in the fleet "
                              "(set it first: mcp secret set db)")
    assert etcd.get(SERVICES + "app") is None                     # nothing placed
    c1.secret_set("db", VALUE)
    st = c1.deploy(defn("c2"))
    assert st["node"] == "c2"
    rec = etcd.get(SERVICES + "app")
    assert rec is not None
    assert rec.value["definition"]["components"][0]["secret_versions"] == {"db": 1}
    local = c2.local.registry.get_service("app").components[0].defn
    assert local.secret_versions == (("db", 1),)
    assert c2.local.secret_value("db", 1) == VALUE                # what its workload gets
    assert c1.plan(defn("c2"))["changed"] is False
    assert c1.secret_set("db", b"second")["used_by"] == ["app"]
    plan = c2.plan(defn("c2"))
    assert plan["changes"][0]["fields"] == [
        {"field": "secret_versions", "from": [["db", 1]], "to": [["db", 2]]}]
    assert c2.local.registry.get_service("app").components[0].defn.secret_versions == \
        (("db", 1),)                                                 # runs v1 until deployed
    c1.deploy(defn("c2"))
    assert c2.local.registry.get_service("app").components[0].defn.secret_versions == \
        (("db", 2),)
    etcd.down = True                      # a restart of the workload needs no etcd
    assert c2.local.secret_value("db", 2) == b"second"
    etcd.down = False
    for v in range(3, 7):                     # v2 is pinned by the record: kept beyond 3
        c1.secret_set("db", b"v%d" % v)
    assert c1.secret_list()[0]["versions"] == [2, 4, 5, 6]
    with pytest.raises(ConflictError) as refused:
        c2.secret_remove("db")
    assert str(refused.value) == ("secret db is used by service app in the fleet: take it "
                                  "out of their definitions and deploy them, or undeploy "
                                  "them, first")
    c1.deploy(defn("c1", name="other"))
    with pytest.raises(ConflictError, match="used by services app, other in the fleet"):
        c1.secret_remove("db")
    c1.undeploy("app")
    c1.undeploy("other")
    c1.secret_remove("db")
    c1.secret_set("db", b"anew")            # version 1 again: c2 reads etcd's, not its last
    assert c2.local.secret_value("db", 1) == b"anew"


def test_rm_and_a_deploy_cannot_race_past_each_other(
        fleet: dict[str, FleetOperations], etcd: FakeEtcd,
        monkeypatch: pytest.MonkeyPatch) -> None:
    c1, c2 = fleet["c1"], fleet["c2"]
    c1.secret_set("db", VALUE)
    # a deploy commits between rm's read of the services and its transaction
    real_get = etcd.get
    raced: list[str] = []

    def get(key: str) -> Any:
        if key == SECRETS + "db" and not raced:
            raced.append(key)
            c2.deploy(defn("c2"))
        return real_get(key)

    monkeypatch.setattr(etcd, "get", get)
    with pytest.raises(ConflictError, match="used by service app"):
        c1.secret_remove("db")
    assert raced and etcd.get(SECRETS + "db") is not None
    monkeypatch.setattr(etcd, "get", real_get)
    c1.undeploy("app")
    # an rm commits between a deploy's read of the secret and its placement
    pin = c1.fleet.secrets.pin

    def pin_then_rm(d: Any) -> Any:
        out = pin(d)
        if etcd.get(SECRETS + "db") is not None:
            c2.secret_remove("db")
        return out

    monkeypatch.setattr(c1.fleet.secrets, "pin", pin_then_rm)
    with pytest.raises(ValidationError, match="secret 'db' is not set in the fleet"):
        c1.deploy(defn("c1"))
    assert etcd.get(SERVICES + "app") is None


def test_node_without_a_key_refuses_writes_and_runs_nothing_saying_why(
        tmp_path: Path, etcd: FakeEtcd, caplog: pytest.LogCaptureFixture) -> None:
    agents = make_fleet(tmp_path, etcd, {"c1": KEY, "c2": None})
    c1, c2 = agents["c1"], agents["c2"]
    try:
        for write in (lambda: c2.secret_set("db", VALUE), lambda: c2.secret_remove("db")):
            with pytest.raises(SecretStoreError) as exc:
                write()
            assert "secrets.fleet_key_file is not set" in str(exc.value)
        c1.secret_set("db", VALUE)
        assert [s["name"] for s in c2.secret_list()] == ["db"]     # reads need no key
        with pytest.raises(WorkloadError) as failed:
            c1.deploy(defn("c2"))
        assert str(failed.value).startswith(
            "node c2: cannot run service app: secret db version 1: this node has no fleet "
            "key (secrets.fleet_key_file is not set)")
        assert "nothing changed here" in str(failed.value)
        assert not c2.local.registry.has_service("app")            # nothing ran there
        assert etcd.get(SERVICES + "app") is None                  # the record put back
        # placed there another way (a move): the fleet's status says why it does not run
        c1.deploy(defn("c1"))
        moved = etcd.get(SERVICES + "app")
        assert moved is not None
        etcd.put(SERVICES + "app", {**moved.value, "node": "c2",
                                    "generation": moved.value["generation"] + 1})
        c2.fleet.sync()
        st = c1.status("app")
        assert st["fleet"]["error"].startswith("node c2: cannot run service app: secret db "
                                               "version 1: this node has no fleet key")
        assert not c2.local.registry.has_service("app")
        assert VALUE.decode() not in caplog.text + json.dumps(st)
    finally:
        for a in agents.values():
            a.close()


def test_wrong_key_and_altered_record_are_told_apart(tmp_path: Path, etcd: FakeEtcd) -> None:
    agents = make_fleet(tmp_path, etcd, {"c1": KEY, "c2": os.urandom(32), "c3": KEY})
    c1, c2, c3 = agents["c1"], agents["c2"], agents["c3"]
    try:
        c1.secret_set("db", VALUE)
        with pytest.raises(WorkloadError) as failed:
            c1.deploy(defn("c2"))
        msg = str(failed.value)
        assert msg.startswith("node c2: cannot run service app: secret db version 1: it was "
                              "sealed with fleet key ")
        assert "but this node's secrets.fleet_key_file" in msg and "give this node the " \
            "fleet's key" in msg
        assert not c2.local.registry.has_service("app")
        with pytest.raises(SecretStoreError, match="this node's fleet key .* is not the one "
                           "the fleet's secrets are sealed with"):
            c2.secret_set("other", VALUE)               # what it sealed nobody could open
        assert etcd.get(SECRETS + "other") is None
        # one bit of the ciphertext flipped in etcd: AES-GCM fails on the right key (c3's;
        # c1 read the version before, and a version it has read never changes for it)
        kv = etcd.get(SECRETS + "db")
        assert kv is not None
        ver = kv.value["versions"]["1"]
        ct = bytearray(base64.b64decode(ver["ciphertext"]))
        ct[0] ^= 1
        ver["ciphertext"] = base64.b64encode(bytes(ct)).decode()
        etcd.put(SECRETS + "db", kv.value)
        with pytest.raises(WorkloadError, match="node c3: cannot run service app: secret db "
                           "version 1: .*AES-GCM authentication failed"):
            c2.deploy(defn("c3"))
        assert not c3.local.registry.has_service("app")
        # a version gone from etcd (not through rm): the node says so
        etcd.delete(SECRETS + "db")
        c1.secret_set("db", VALUE)
        etcd.put(SERVICES + "x", {"node": "c1", "generation": 1, "state": "running",
                                  "definition": {**defn().to_dict(), "name": "x", "components": [
                                      {**defn().to_dict()["components"][0],
                                       "secret_versions": {"db": 7}}]}})
        c1.fleet.sync()
        assert "cannot run service x: components[0].secret_versions: secret 'db' version 7 " \
            "is no longer kept in the fleet" in c1.status("x")["fleet"]["error"]
    finally:
        for a in agents.values():
            a.close()


def test_check_config_and_new_fleet_key(tmp_path: Path) -> None:
    def errors(path: Path) -> list[str]:
        cfg = config_from_dict({"secrets": {"fleet_key_file": str(path)}})
        return [str(e) for e in check_key_file(cfg.secrets)]

    assert check_key_file(config_from_dict({}).secrets) == []
    missing = tmp_path / "nope.key"
    assert errors(missing) == [f"secrets.fleet_key_file: secret key file {missing} is missing "
                               "(restore it from your backup; secrets.fleet_key_file names it)"]
    key = tmp_path / "fleet.key"
    res = CliRunner().invoke(agent_main, ["--state-dir", str(tmp_path / "s"), "secrets",
                                          "new-fleet-key", str(key)])
    assert res.exit_code == 0, res.output
    assert oct(key.stat().st_mode & 0o777) == "0o600" and errors(key) == []
    assert len(base64.b64decode(key.read_bytes().strip())) == 32
    again = CliRunner().invoke(agent_main, ["--state-dir", str(tmp_path / "s"), "secrets",
                                            "new-fleet-key", str(key)])
    assert again.exit_code == 1 and "exists; a fleet has one key" in again.output
    key.chmod(0o644)
    assert "must be mode 0600 (is 0644)" in errors(key)[0]
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[secrets]\nfleet_key_file = "{key}"\n')
    res = CliRunner().invoke(agent_main, ["--config", str(conf), "check-config"])
    assert res.exit_code == 1 and f"{conf}: secrets.fleet_key_file: secret key file {key} " \
        "(secrets.fleet_key_file) must be mode 0600 (is 0644)" in res.output
    key.chmod(0o600)
    res = CliRunner().invoke(agent_main, ["--config", str(conf), "check-config"])
    assert (res.exit_code, res.output) == (0, f"{conf}: ok\n")
    short = tmp_path / "short.key"
    write_key(short, os.urandom(16), exclusive=True)
    assert errors(short) == [f"secrets.fleet_key_file: secret key file {short} "
                             "(secrets.fleet_key_file) does not hold a key (base64 of 32 "
                             "bytes)"]
