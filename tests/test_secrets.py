"""Secrets (issue 20), without podman or qemu: the sealed store (wrong key, rotation,
tampered rows), migration 016, definitions naming secrets, the agent's deploy and plan
with secret versions, removal refused while used, env values redacted for readers, and
``mcp secret ...`` through CliRunner against a live API (exact output, exit codes)."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_runtime import FakeWorld
from live_server import fake_live

from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import (
    ConflictError,
    NotFoundError,
    SecretStoreError,
    ValidationError,
)
from mcp_node.redact import REDACTED, for_role
from mcp_node.registry import Registry
from mcp_node.secretstore import SecretStore, decode_value, key_id, read_key, write_key
from mcp_node.servicedef import from_dict

VALUE = b"s3cr3t-Zq7Xv9"


def store(tmp_path: Path) -> SecretStore:
    return SecretStore(Registry(tmp_path / "registry.db"), tmp_path / "secrets.key")


def never(name: str, version: int) -> bool:
    return False


def test_set_seals_and_opens_and_never_stores_the_value_in_clear(tmp_path: Path) -> None:
    s = store(tmp_path)
    info = s.set("db-password", VALUE, never)
    assert (info["name"], info["version"], info["versions"]) == ("db-password", 1, [1])
    assert s.value("db-password", 1) == VALUE
    assert oct((tmp_path / "secrets.key").stat().st_mode & 0o777) == "0o600"
    s.set("db-password", b"second", never)
    assert [r["version"] for r in s.list()] == [2] and s.versions() == {"db-password": 2}
    s.registry.close()
    for f in tmp_path.iterdir():
        assert VALUE not in f.read_bytes(), f


def test_old_versions_go_unless_kept(tmp_path: Path) -> None:
    s = store(tmp_path)
    for i in range(6):
        s.set("a", f"v{i}".encode(), lambda n, v: v == 1)
    assert s.list()[0]["versions"] == [1, 4, 5, 6]
    with pytest.raises(NotFoundError, match="secret a has no version 2"):
        s.value("a", 2)


def test_wrong_key_tampered_row_and_bad_key_file_are_clear_errors(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.set("a", VALUE, never)
    good = read_key(s.key_path)
    with sqlite3.connect(tmp_path / "registry.db") as db:
        row = db.execute("SELECT ciphertext FROM secrets").fetchone()[0]
        db.execute("UPDATE secrets SET ciphertext=?", (bytes([row[0] ^ 1]) + row[1:],))
    with pytest.raises(SecretStoreError, match="secret a version 1 cannot be opened: its "
                       "stored ciphertext or record was altered"):
        s.value("a", 1)
    s.set("b", VALUE, never)
    write_key(s.key_path, os.urandom(32), exclusive=False)
    with pytest.raises(SecretStoreError, match=f"secret b version 1 was sealed with key "
                       f"{key_id(good)}, but the key file .* holds key"):
        s.value("b", 1)
    os.chmod(s.key_path, 0o644)
    with pytest.raises(SecretStoreError, match="must be mode 0600 \\(is 0644\\)"):
        s.value("b", 1)
    s.key_path.unlink()
    with pytest.raises(SecretStoreError, match="secret key file .* is missing"):
        s.value("b", 1)


def test_rotate_seals_every_row_under_a_new_key(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.set("a", VALUE, never)
    s.set("b", b"other", never)
    old = read_key(s.key_path)
    assert s.rotate() == 2
    new = read_key(s.key_path)
    assert new != old and not s.pending_path.exists()
    assert (s.value("a", 1), s.value("b", 1)) == (VALUE, b"other")
    assert s.registry.secret_key_ids() == {key_id(new)}


def test_a_rotation_cut_after_its_commit_is_finished_by_the_next_reader(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.set("a", VALUE, never)
    real = os.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError, match="crash"):
            s.rotate()
    assert s.pending_path.exists() and os.replace is real
    assert s.value("a", 1) == VALUE          # finishes the move
    assert not s.pending_path.exists()


def test_migration_016_makes_the_table_in_one_step(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db", migrate_to=15)
    assert reg.schema_version() == 15
    assert not reg._query("SELECT name FROM sqlite_master WHERE name='secrets'")
    assert reg.migrate() >= 16
    assert reg._query("SELECT name FROM schema_migrations WHERE version=16")[0][0] == "secrets"
    assert reg.secret_rows() == []


def test_definitions_name_secrets() -> None:
    d = from_dict({"name": "s", "components": [{
        "name": "web", "image": "img:v1", "secrets": ["db-password"],
        "env": ["A=1", "DB=secret:db-password", "T=secret:token"]}]})
    c = d.components[0]
    assert c.secrets == ("db-password",) and c.used_secrets == ("db-password", "token")
    assert "secret_versions" not in d.to_dict()["components"][0]
    pinned = from_dict({**d.to_dict(), "components": [{**d.to_dict()["components"][0],
                                                        "secret_versions": {"token": 3}}]})
    assert pinned.components[0].secret_versions == (("token", 3),)
    assert pinned.to_dict()["components"][0]["secret_versions"] == {"token": 3}
    for comp, field in (({"secrets": ["Bad"]}, "components[0].secrets[0]"),
                        ({"secrets": ["a", "a"]}, "components[0].secrets[1]"),
                        ({"env": ["X=secret:"]}, "components[0].env[0]"),
                        ({"secret_versions": {"a": 0}}, "components[0].secret_versions.a")):
        with pytest.raises(ValidationError) as exc:
            from_dict({"name": "s", "components": [{"name": "w", "image": "i:1", **comp}]})
        assert exc.value.field == field


def test_decode_value() -> None:
    assert decode_value({"value": base64.b64encode(VALUE).decode()}) == VALUE
    for body, what in (({"value": "!!"}, "not base64"), ({"v": "x"}, "expected"),
                       ({"value": ""}, "must not be empty")):
        with pytest.raises(ValidationError, match=what):
            decode_value(body)


def agent(tmp_path: Path) -> Agent:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")}})
    return Agent(cfg, runtimes=FakeWorld().runtimes())


DEFN = {"name": "app", "components": [{"name": "web", "image": "img:v1",
                                       "secrets": ["db-password"],
                                       "env": ["DB=secret:db-password", "MODE=prod"]}]}


def test_deploy_records_versions_plan_shows_a_change_rm_is_refused(tmp_path: Path) -> None:
    a = agent(tmp_path)
    try:
        with pytest.raises(ValidationError) as exc:
            a.deploy(from_dict(DEFN))
        assert str(exc.value) == ("components[0].secrets: secret 'db-password' is not set "
                                  "on this node (set it first: mcp secret set db-password)")
        assert not a.registry.has_service("app")          # nothing changed
        a.secret_set("db-password", VALUE)
        status = a.deploy(from_dict(DEFN))
        assert status["definition"]["components"][0]["secret_versions"] == {"db-password": 1}
        assert a.plan(from_dict(DEFN))["changed"] is False
        assert a.secret_set("db-password", b"new")["used_by"] == ["app"]
        plan = a.plan(from_dict(DEFN))
        assert plan["changes"] == [{"action": "replace", "component": "web",
                                    "reason": "definition differs", "fields": [
                                        {"field": "secret_versions", "from": [["db-password", 1]],
                                         "to": [["db-password", 2]]}]}]
        spec = a.spec("app", a.registry.get_service("app").components[0])
        assert spec.secret_versions == (("db-password", 1),)   # runs v1 until deployed
        assert a.deploy(from_dict(DEFN))["unchanged"] is False
        with pytest.raises(ConflictError, match="secret db-password is used by deployed "
                           "service app: take it out"):
            a.secret_remove("db-password")
        listed = a.secret_list()
        assert [(s["name"], s["version"], s["used_by"]) for s in listed] == \
            [("db-password", 2, ["app"])]
        assert "value" not in json.dumps(listed)
        a.undeploy("app")
        a.secret_remove("db-password")
        with pytest.raises(NotFoundError, match="no secret 'db-password' on this node"):
            a.secret_remove("db-password")
    finally:
        a.close()


def test_redaction_by_role() -> None:
    status = {"definition": {"components": [{"env": ["A=1", "B=secret:x"]}]}}
    plan = {"changes": [{"fields": [{"field": "env", "from": ["A=1"], "to": ["A=2"]}]}]}
    assert for_role("operator", status) is status and for_role("master", plan) is plan
    assert for_role("reader", status) == {"definition": {"components": [
        {"env": [f"A={REDACTED}", f"B={REDACTED}"]}]}}
    assert for_role("reader", plan)["changes"][0]["fields"][0] == {
        "field": "env", "from": [f"A={REDACTED}"], "to": [f"A={REDACTED}"]}


def test_reader_sees_env_keys_only_and_cli_secret_commands(tmp_path: Path) -> None:
    with fake_live(tmp_path) as live:
        tok = tmp_path / "op.tok"
        tok.write_text(live.operator_token)
        tok.chmod(0o600)
        base = ["--agent", live.url, "--token-file", str(tok)]
        runner = CliRunner()
        res = runner.invoke(cli, [*base, "secret", "set", "db-password"], input="hunter2-xyz\n")
        assert (res.exit_code, res.stdout) == (0, "secret db-password version 1 stored\n")
        vfile = tmp_path / "v"
        vfile.write_bytes(b"line1\nline2\n")
        res = runner.invoke(cli, [*base, "secret", "set", "db-password", "--from-file",
                                  str(vfile)])
        assert (res.exit_code, res.stdout) == (0, "secret db-password version 2 stored\n")
        live.agent.deploy(from_dict(DEFN))
        assert live.agent.secret_value("db-password", 2) == b"line1\nline2\n"
        res = runner.invoke(cli, [*base, "secret", "list"])
        assert res.exit_code == 0
        lines = res.stdout.splitlines()
        assert lines[0].split() == ["NAME", "VERSION", "UPDATED", "CREATED", "USED", "BY"]
        assert lines[1].split()[:2] == ["db-password", "2"] and lines[1].endswith("app")
        res = runner.invoke(cli, [*base, "secret", "rm", "db-password"])
        assert (res.exit_code, res.stderr) == (1, "Error: secret db-password is used by "
                                               "deployed service app: take it out of their "
                                               "definitions and deploy them, or undeploy "
                                               "them, first\n")
        res = runner.invoke(cli, [*base, "secret", "rm", "nosuch"])
        assert (res.exit_code, res.stderr) == (1, "Error: no secret 'nosuch' on this node\n")
        res = runner.invoke(cli, [*base, "secret", "set", "Bad!"], input="x")
        assert res.exit_code == 1 and "is not a valid secret name" in res.stderr

        reader = live.client("reader")
        st = reader.get("/v1/services/app")
        assert st["definition"]["components"][0]["env"] == [f"DB={REDACTED}",
                                                           f"MODE={REDACTED}"]
        assert live.client("operator").get("/v1/services/app")["definition"][
            "components"][0]["env"] == ["DB=secret:db-password", "MODE=prod"]
        assert reader.get("/v1/secrets")[0]["name"] == "db-password"
        forbidden = live.request("PUT", "/v1/secrets/x", b'{"value": "eA=="}', role="reader")
        assert forbidden.status == 403
        raw = live.request("PUT", "/v1/secrets/x", b'{"value": "eA=="}')
        assert raw.status == 200 and b"eA==" not in raw.body
        gone = live.request("DELETE", "/v1/secrets/x")
        assert (gone.status, json.loads(gone.body)) == (200, {"name": "x", "removed": True})
        live.agent.undeploy("app")
        res = runner.invoke(cli, [*base, "secret", "rm", "db-password"])
        assert (res.exit_code, res.stdout) == (0, "removed secret db-password\n")
        res = runner.invoke(cli, [*base, "secret", "list"])
        assert (res.exit_code, res.stdout) == (0, "no secrets\n")


def test_secret_dirs_a_crash_left_are_found_and_removed(tmp_path: Path) -> None:
    """A crash between writing a workload's secret files and its create (or a VM's
    build and its boot) leaves them: found once old enough and unused, then removed;
    one in use, one being made now, and the other runtime's stay."""
    import os
    import time

    from mcp_node.config import SecretsConfig
    from mcp_node.secretfiles import LEFTOVER_AGE_S, SecretDirs

    dirs = SecretDirs(SecretsConfig(runtime_dir=str(tmp_path / "run")), "owner1")
    dirs.base.mkdir(parents=True)

    def made(name: str, vm: bool = False, age: float = LEFTOVER_AGE_S + 5) -> Path:
        d = dirs.base / name
        (d / "secrets" if vm else d).mkdir(parents=True)
        (d / ("secrets" if vm else ".") / "db").write_bytes(b"value")
        t = time.time() - age
        os.utime(d, (t, t))
        return d

    left, used, young = made("mcp-a-web.x1"), made("mcp-b-web.x2"), made("mcp-c-web.x3", age=1)
    vm = made("mcp-d-vm.x4", vm=True)
    found = dirs.leftovers(vm=False, in_use=[str(used / "db")])
    assert found == [left]
    assert dirs.leftovers(vm=True) == [vm]
    dirs.reap(found)
    assert not left.exists() and used.exists() and young.exists() and vm.exists()
