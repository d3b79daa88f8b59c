"""plan: the pure comparison, and ``mcp plan`` / ``validate`` / ``deploy -`` through the CLI
with exact output and exit codes (in-process against the fake runtime)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_runtime import FakeWorld

from mcp_node import clictx
from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.config import from_dict as config_from_dict
from mcp_node.plan import plan
from mcp_node.servicedef import from_dict


def svc(active: bool = True, **web: Any) -> Any:
    return from_dict({"name": "shop", "active": active, "components": [
        {"name": "web", "image": "img:v1", "env": ["A=1"], **web},
        {"name": "db", "image": "db:v1"}]})


def test_nothing_changes_for_the_same_definition() -> None:
    assert plan(svc(), svc()).changes == []


def test_a_changed_field_replaces_naming_the_field() -> None:
    [ch] = plan(svc(), svc(env=["A=2"])).changes
    assert (ch.action, ch.component, ch.fields) == ("replace", "web",
                                                   (("env", ("A=1",), ("A=2",)),))


def test_new_removed_down_and_inactive() -> None:
    new = from_dict({"name": "shop", "components": [
        {"name": "web", "image": "img:v1", "env": ["A=1"]}, {"name": "cache", "image": "c:1"}]})
    p = plan(svc(), new, {"web": "stopped"})
    assert [(c.action, c.component) for c in p.changes] == [
        ("start", "web"), ("create", "cache"), ("remove", "db")]
    assert [(c.action, c.component) for c in plan(svc(), svc(active=False)).changes] == [
        ("stop", "web"), ("stop", "db")]
    assert [c.action for c in plan(None, svc()).changes] == ["create", "create"]


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    world = FakeWorld()
    agent = Agent(config_from_dict({"state": {"dir": str(tmp_path / "st")}}),
                  runtimes=world.runtimes())
    backend = clictx.LocalBackend
    monkeypatch.setattr(clictx, "LocalBackend", lambda **kw: backend(agent))  # --local: this agent
    yield agent
    agent.close()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "shop.toml"
    p.write_text(text)
    return p


DEF = 'name = "shop"\n[[components]]\nname = "web"\nimage = "img:v1"\nenv = ["A=1"]\n'


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["--local", *args], input=input)


def test_plan_validate_and_deploy_from_stdin(local: Agent, tmp_path: Path) -> None:
    f = write(tmp_path, DEF)
    res = run("validate", str(f))
    assert (res.exit_code, res.stdout) == (   # --local: the in-process agent checked it
        0, f"shop: valid (1 component(s)), checked by {local.node}\n")
    res = run("plan", str(f))
    assert (res.exit_code, res.stdout) == (3, "shop: 1 change(s)\n  create web (new component)\n")
    res = run("deploy", "-", input=DEF)
    assert res.exit_code == 0, res.output
    assert local.registry.get_service("shop").component("web").defn.env == ("A=1",)
    res = run("plan", str(f))
    assert (res.exit_code, res.stdout) == (0, "shop: no changes\n")
    f.write_text(DEF.replace("A=1", "A=2"))
    res = run("--json", "plan", str(f))
    assert res.exit_code == 3
    assert json.loads(res.stdout) == {"service": "shop", "changed": True, "changes": [
        {"action": "replace", "component": "web", "reason": "definition differs",
         "fields": [{"field": "env", "from": ["A=1"], "to": ["A=2"]}]}]}
    res = run("deploy", "-", input=json.dumps({"name": "shop", "components": [
        {"name": "web", "image": "img:v1", "env": ["A=2"]}]}))
    assert res.exit_code == 0, res.output
    assert run("plan", str(f)).exit_code == 0


def test_validate_names_the_bad_field_and_changes_nothing(local: Agent,
                                                          tmp_path: Path) -> None:
    f = write(tmp_path, DEF.replace('name = "web"', 'name = "Web"'))
    res = run("validate", str(f))
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: components[0].name: ")
    res = run("deploy", "-", input="name = \n")
    assert res.exit_code == 1 and res.stderr.startswith("Error: not valid TOML")
    assert local.registry.list_services() == []


def test_history_and_rollback_commands(local: Agent, tmp_path: Path) -> None:
    f = write(tmp_path, DEF)
    assert run("deploy", str(f)).exit_code == 0
    f.write_text(DEF.replace("img:v1", "img:v2"))
    assert run("deploy", str(f)).exit_code == 0
    res = run("history", "shop")
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and lines[0].split() == ["VERSION", "DEPLOYED", "DIGEST", "IMAGES"]
    assert [ln.split()[0] for ln in lines[1:]] == ["1", "2*"]
    assert [ln.split()[-1] for ln in lines[1:]] == ["img:v1", "img:v2"]
    res = run("rollback", "shop")
    assert res.exit_code == 0 and res.stdout.startswith("rolled back shop\n")
    assert local.registry.get_service("shop").component("web").defn.image == "img:v1"
    res = run("--json", "history", "shop")
    assert [r["current"] for r in json.loads(res.stdout)] == [False, False, True]
    res = run("rollback", "shop", "7")
    assert (res.exit_code, res.stderr) == (
        1, "Error: service 'shop' has no version 7 (versions: 1, 2, 3)\n")
    res = run("rollback", "shop", "0")
    assert res.exit_code == 2


TWO = DEF + '[[components]]\nname = "db"\nimage = "db:v1"\n'


def test_per_component_lifecycle_and_stop_timeout(local: Agent, tmp_path: Path) -> None:
    world = local.runtime("container").world  # type: ignore[attr-defined]
    assert run("deploy", str(write(tmp_path, TWO))).exit_code == 0
    res = run("stop", "shop", "db", "--timeout", "2.5")
    assert (res.exit_code, res.stdout) == (0, "stopped shop/db\n")
    assert world.stop_timeouts[-1] == 2.5
    rec = local.registry.get_service("shop")
    assert [(c.defn.name, c.desired_state) for c in rec.components] == [
        ("web", "running"), ("db", "stopped")]
    assert rec.active is True                       # one component stopped, not the service
    assert world.workloads[("shop", "web")].state == "running"
    res = run("start", "shop", "db")
    assert res.exit_code == 0 and res.stdout.startswith("started shop/db\n")
    res = run("restart", "shop", "nope")
    assert (res.exit_code, res.stderr) == (
        1, "Error: service 'shop' has no component 'nope' (components: web, db)\n")
    res = run("stop", "shop", "--timeout", "99999")
    assert res.exit_code == 2
    assert run("stop", "shop").exit_code == 0
    assert local.registry.get_service("shop").active is False


def test_ctrl_c_says_what_the_agent_still_does(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    import threading

    from mcp_node.clictx import Ctx
    from mcp_node.cliwait import with_progress

    release = threading.Event()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "join", join)
    ctx = Ctx(None, None, False, None, False)
    with pytest.raises(SystemExit) as exit_:
        with_progress(ctx, "stopping", "shop", release.wait)
    release.set()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == (
        "\ninterrupted: the agent goes on stopping shop; `mcp status shop` shows where it is\n")


def test_progress_shows_each_components_step_as_it_changes(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    import threading
    import time

    from mcp_node import cliwait as cli_mod
    from mcp_node.clictx import Ctx

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(cli_mod, "PROGRESS_POLL_S", 0.005)
    monkeypatch.setattr(time, "monotonic", lambda: 100.0)  # no elapsed-time line
    states: list[dict[str, str]] = [
        {}, {"web": "pulling img:v1"}, {"web": "pulling img:v1", "db": "unchanged"},
        {"web": "starting", "db": "unchanged"}, {"web": "running", "db": "unchanged"}]
    done = threading.Event()

    class Agent:
        """A backend whose progress moves one step per poll, like a deploy's."""

        asked = 0

        def call(self, op: str, service: str) -> dict[str, Any]:
            assert (op, service) == ("progress", "shop")
            now = states[min(self.asked, len(states) - 1)]
            self.asked += 1
            if self.asked >= len(states):
                done.set()
            return {"service": "shop", "operation": "deploy", "components": now}

    ctx = Ctx(None, None, False, None, False)
    assert cli_mod.with_progress(ctx, "deploying", "shop", lambda: done.wait(10) and "ok",
                                 Agent()) == "ok"  # type: ignore[arg-type]
    assert capsys.readouterr().err == (
        "\r\x1b[Kdeploying shop ...\n  web: pulling img:v1\n"
        "\r\x1b[K  db: unchanged\n"
        "\r\x1b[K  web: starting\n"
        "\r\x1b[K  web: running\n"
        "\r\x1b[Kdeploying shop ... done in 0.0s\n")
    ctx.json = True   # --json (or no terminal): nothing but the call
    assert cli_mod.with_progress(ctx, "deploying", "shop", lambda: "ok", Agent()) == "ok"  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""


def test_a_change_of_the_service_tables_alone_is_a_change(local: Agent, tmp_path: Path) -> None:
    """``mcp plan && echo nothing to do`` must not say nothing for a deploy that changes
    what the node does (a rollout's order, who may reach the service)."""
    assert run("deploy", "-", input=DEF).exit_code == 0
    f = write(tmp_path, 'name = "shop"\n[update]\norder = "start-first"\n'
                        '[network]\nallow_from = ["blog"]\n' + DEF.split("\n", 1)[1])
    res = run("plan", str(f))
    assert (res.exit_code, res.stdout) == (3, (
        "shop: 1 change(s)\n  set (service) (service settings differ; no workload is "
        "replaced for them)\n      update.order: '' -> 'start-first'\n"
        "      network.allow_from: [] -> ['blog']\n"))
    res = run("--json", "plan", str(f))
    assert json.loads(res.stdout)["changes"] == [
        {"action": "set", "component": "", "reason": "service settings differ; no workload "
         "is replaced for them", "fields": [
             {"field": "update.order", "from": "", "to": "start-first"},
             {"field": "network.allow_from", "from": [], "to": ["blog"]}]}]
    assert run("deploy", str(f)).exit_code == 0
    assert run("plan", str(f)).stdout == "shop: no changes\n"
