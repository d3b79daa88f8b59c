"""Several nodes from one CLI: two live agents over HTTP (runtimes faked), one of them
stopped mid-test. Fleet reads answer from the nodes that answer; per-service commands
find the node that has the service; mcp.toml typos are refused naming them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fake_runtime import FakeWorld

from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.config import from_dict as config_from_dict
from mcp_node.server import AgentServer, serve
from mcp_node.servicedef import from_dict


@dataclass
class Node:
    name: str
    agent: Agent
    server: AgentServer
    world: FakeWorld

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, Node]]:
    out: dict[str, Node] = {}
    lines = []
    for name in ("alpha", "beta"):
        world = FakeWorld()
        cfg = config_from_dict({"state": {"dir": str(tmp_path / name)},
                                "server": {"listen": "127.0.0.1:0"}})
        agent = Agent(cfg, runtimes=world.runtimes())
        srv = serve(agent, cfg)
        out[name] = Node(name, agent, srv, world)
        lines.append(f'[[nodes]]\nname = "{name}"\naddress = "{srv.url}"\n'
                     f'token_path = "{srv.token_file}"\n')
    conf = tmp_path / "xdg-config" / "mcp"
    conf.mkdir(parents=True)
    (conf / "mcp.toml").write_text("".join(lines))
    yield out
    for n in out.values():
        with contextlib.suppress(OSError):   # stopped by the test already
            n.stop()
        n.agent.close()


def mcp(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def deploy(node: Node, name: str) -> None:
    node.agent.deploy(from_dict({"name": name, "components": [{"name": "web", "image": "i:1"}]}))


def test_fleet_reads_answer_from_every_node_with_configured_names(
        nodes: dict[str, Node]) -> None:
    deploy(nodes["alpha"], "a1")
    deploy(nodes["beta"], "b1")
    res = mcp("--json", "ps")
    assert res.exit_code == 0, res.output
    assert sorted((r["service"], r["node"]) for r in json.loads(res.stdout)) == [
        ("a1", "alpha"), ("b1", "beta")]
    res = mcp("--json", "node", "health")
    assert res.exit_code == 0
    assert [(h["node"], h["status"]) for h in json.loads(res.stdout)] == [
        ("alpha", "healthy"), ("beta", "healthy")]


def test_per_service_commands_find_their_node(nodes: dict[str, Node]) -> None:
    deploy(nodes["beta"], "b1")
    res = mcp("--json", "status", "b1")
    assert res.exit_code == 0 and json.loads(res.stdout)["node"] == "beta"
    assert mcp("stop", "b1").exit_code == 0
    assert nodes["beta"].agent.registry.get_service("b1").components[0].desired_state == \
        "stopped"
    res = mcp("status", "zz")
    assert (res.exit_code, res.stderr) == (
        1, "Error: unknown service 'zz' on nodes alpha, beta; deploy it with -n NODE\n")
    deploy(nodes["alpha"], "b1")
    res = mcp("status", "b1")
    assert (res.exit_code, res.stderr) == (
        1, "Error: service 'b1' is on nodes alpha, beta; pick one with -n NODE\n")
    assert mcp("-n", "alpha", "status", "b1").exit_code == 0


def test_a_new_service_on_a_fleet_needs_a_node(nodes: dict[str, Node],
                                               tmp_path: Path) -> None:
    f = tmp_path / "new.toml"
    f.write_text('name = "new"\n[[components]]\nname = "web"\nimage = "i:1"\n')
    res = mcp("deploy", str(f))
    assert res.exit_code == 1 and "deploy it with -n NODE" in res.stderr
    assert mcp("-n", "beta", "deploy", str(f)).exit_code == 0
    assert nodes["beta"].agent.registry.has_service("new")
    assert not nodes["alpha"].agent.registry.has_service("new")
    assert mcp("deploy", str(f)).exit_code == 0      # now it is found on beta


def test_a_stopped_node_is_marked_and_the_others_answer(nodes: dict[str, Node]) -> None:
    deploy(nodes["alpha"], "a1")
    deploy(nodes["beta"], "b1")
    nodes["beta"].stop()
    res = mcp("--json", "ps")
    assert res.exit_code == 4
    assert [r["service"] for r in json.loads(res.stdout)] == ["a1"]
    assert res.stderr.startswith("warning: node beta: the agent is not reachable at ")
    res = mcp("--json", "node", "health")
    assert res.exit_code == 4
    assert [(h["node"], h["status"]) for h in json.loads(res.stdout)] == [
        ("alpha", "healthy"), ("beta", "unreachable")]
    assert mcp("status", "a1").exit_code == 0    # found on the node that answers
    res = mcp("status", "b1")
    assert res.exit_code == 1 and "not reachable: beta" in res.stderr
    nodes["alpha"].stop()
    res = mcp("ps")
    assert res.exit_code == 1 and res.stderr.startswith("Error: no node answered:\n  node alpha")


def test_a_degraded_node_exits_3(nodes: dict[str, Node]) -> None:
    deploy(nodes["alpha"], "a1")
    nodes["alpha"].world.workloads.clear()           # its workload vanished: drift
    nodes["alpha"].agent.monitor.refresh()
    res = mcp("node", "health")
    assert res.exit_code == 3 and "status: degraded" in res.stdout


@pytest.mark.parametrize(("text", "field"), [
    ('tokenpath = "x"\n', "tokenpath"),
    ('[[node]]\nname = "a"\naddress = "b"\n', "node"),
    ('[[nodes]]\nname = "a"\naddress = "b"\nca_file = "x"\n', "nodes[0].ca_file"),
])
def test_mcp_toml_typos_are_refused_naming_them(tmp_path: Path, text: str,
                                                field: str) -> None:
    conf = tmp_path / "xdg-config" / "mcp"
    conf.mkdir(parents=True)
    (conf / "mcp.toml").write_text(text)
    res = mcp("ps")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: {conf / 'mcp.toml'}: {field}: unknown key ")
