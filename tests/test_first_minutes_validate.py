"""Issue 22 row 2: ``mcp validate`` runs at the agent the checks its deploy runs before
changing anything (volume roots, host paths that exist, capacity as a warning), and
says so when no agent answered and only the definition itself was checked."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from etcd_env import EtcdCluster
from fake_runtime import FakeWorld
from server_env import LiveServer

from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.config import from_dict as config_from_dict
from mcp_node.errors import ResourceError, ValidationError
from mcp_node.fleetops import FleetOperations
from mcp_node.runtime import RUNTIME_NAMES
from mcp_node.servicedef import ServiceDef, from_dict
from mcp_node.vmstate import host_memory_mb
from mcp_node.wiring import node_agent

CONTAINER, VM = RUNTIME_NAMES


def definition(path: Path, name: str, extra: str = "") -> Path:
    f = path / f"{name}.toml"
    f.write_text(f'name = "{name}"\n[[components]]\nname = "web"\nimage = "localhost/x:1"\n'
                 + extra)
    return f


def mcp(live: LiveServer, tmp_path: Path, *args: str) -> Result:
    tok = tmp_path / "tok"
    tok.write_text(live.operator_token)
    tok.chmod(0o600)
    return CliRunner().invoke(cli, ["--agent", live.url, "--token-file", str(tok), *args],
                              catch_exceptions=False)


def test_validate_refuses_a_volume_outside_the_roots(live_server: LiveServer,
                                                     tmp_path: Path) -> None:
    f = definition(tmp_path, "etc", 'volumes = ["/etc:/etc"]\n')
    for args in (["validate", str(f)], ["--json", "validate", str(f)]):
        r = mcp(live_server, tmp_path, *args)
        assert (r.exit_code, r.stdout, r.stderr) == (1, "", (
            "Error: components[0].volumes[0]: host path /etc is outside the volume roots "
            f"({tmp_path}); widen [podman] volume_roots to allow it\n"))
    assert live_server.client().get("/v1/services") == []


def test_validate_and_deploy_refuse_a_missing_host_dir_naming_it(live_server: LiveServer,
                                                                 tmp_path: Path) -> None:
    """The deploy's refusal is the same 400 naming the field (not podman's statfs)."""
    f = definition(tmp_path, "gone", f'volumes = ["{tmp_path}/missing:/data"]\n')
    error = (f"Error: components[0].volumes[0]: host path {tmp_path}/missing does not exist "
             "on this node; create it first\n")
    for args in (["validate", str(f)], ["deploy", str(f)]):
        r = mcp(live_server, tmp_path, *args)
        assert (r.exit_code, r.stdout, r.stderr) == (1, "", error), args
    assert live_server.client().get("/v1/services") == []


def test_validate_warns_of_capacity_and_passes(live_server: LiveServer,
                                               tmp_path: Path) -> None:
    f = definition(tmp_path, "big", f'runtime = "{VM}"\nmemory_mb = 99999\n')
    reserve = live_server.agent.config.qemu.reserve_memory_mb
    warnings = [f"components[0]: capacity: not enough memory for mcp-big-web: requested "
                f"99999 MiB + 0 MiB in 0 running VMs + {reserve} MiB reserve > "
                f"{host_memory_mb()} MiB on this host (as of now; what runs may change "
                "before the deploy)"]
    ok, why = live_server.agent.runtime(VM).available()
    if not ok:   # this node lacks a builder or qemu: the deploy would say so first
        warnings.insert(0, f"runtime: the {VM} runtime is not available on this node: {why} "
                           "(a deploy now would be refused)")
    node = live_server.agent.node
    r = mcp(live_server, tmp_path, "validate", str(f))
    assert (r.exit_code, r.stdout) == (0, f"big: valid (1 component(s)), checked by {node}\n")
    assert r.stderr == "".join(f"warning: {w}\n" for w in warnings)
    r = mcp(live_server, tmp_path, "--json", "validate", str(f))
    assert (r.exit_code, json.loads(r.stdout)) == (0, {
        "service": "big", "valid": True, "components": 1, "warnings": warnings,
        "checked_by": node})
    assert live_server.client().get("/v1/services") == []


def test_validate_of_a_good_definition_says_who_checked(live_server: LiveServer,
                                                        tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    f = definition(tmp_path, "good", f'volumes = ["{tmp_path}/data:/data"]\n')
    node = live_server.agent.node
    r = mcp(live_server, tmp_path, "validate", str(f))
    assert (r.exit_code, r.stdout, r.stderr) == (
        0, f"good: valid (1 component(s)), checked by {node}\n", "")
    assert live_server.client().get("/v1/services") == []


def test_validate_with_no_agent_says_it_checked_locally_only(tmp_path: Path) -> None:
    with socket.socket() as s:   # a port nothing listens on: the call is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = definition(tmp_path, "lone", 'volumes = ["/etc:/etc"]\n')   # unchecked locally
    note = (f"note: no agent answered (http://127.0.0.1:{port}: [Errno 111] Connection "
            "refused); checked locally only (volume roots, host paths and capacity not "
            "checked)\n")
    args = ["--agent", f"http://127.0.0.1:{port}"]
    r = CliRunner().invoke(cli, [*args, "validate", str(f)])
    assert (r.exit_code, r.stdout, r.stderr) == (0, "lone: valid (1 component(s))\n", note)
    r = CliRunner().invoke(cli, [*args, "--json", "validate", str(f)])
    assert (r.exit_code, json.loads(r.stdout), r.stderr) == (0, {
        "service": "lone", "valid": True, "components": 1, "warnings": [],
        "checked_by": None}, note)
    # what the definition itself breaks is still refused, agent or none
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n')
    r = CliRunner().invoke(cli, [*args, "validate", str(bad)])
    assert r.exit_code == 1 and "components: at least one component is required" in r.stderr


# -- the preflight on the fake runtime: one piece of code for deploy and validate ----------

@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def agent(world: FakeWorld, tmp_path: Path) -> Iterator[Agent]:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            "podman": {"volume_roots": [str(tmp_path)]}})
    a = Agent(cfg, runtimes=world.runtimes())
    try:
        yield a
    finally:
        a.close()


def vm(memory_mb: int) -> dict[str, object]:
    return {"name": "box", "image": "img:v1", "runtime": VM, "memory_mb": memory_mb}


def test_validate_changes_nothing_and_warns_where_deploy_refuses(agent: Agent,
                                                                 world: FakeWorld) -> None:
    world.capacity_mb[VM] = 512
    big = from_dict({"name": "two", "components": [vm(1024)]})
    out = agent.validate(big)
    assert out == {"service": "two", "valid": True, "components": 1, "checked_by": agent.node,
                   "warnings": ["components[0]: capacity: mcp-two-box: 1024 MiB + 0 MiB > "
                                "512 MiB (as of now; what runs may change before the "
                                "deploy)"]}
    assert world.ops("pull", "run") == [] and not agent.registry.has_service("two")
    with pytest.raises(ResourceError, match=r"1024 MiB \+ 0 MiB > 512 MiB"):
        agent.deploy(big)
    # a redeploy of the same size replaces the VM: its own memory is not counted twice
    one = from_dict({"name": "one", "components": [vm(384)]})
    agent.deploy(one)
    assert agent.validate(one)["warnings"] == []
    world.unavailable[VM] = "no qemu"
    assert agent.validate(one)["warnings"] == [
        f"runtime: the {VM} runtime is not available on this node: no qemu (a deploy now "
        "would be refused)"]


def test_validate_raises_what_deploy_raises(agent: Agent, tmp_path: Path) -> None:
    cases = [({"volumes": ["/etc:/etc"]}, "components[0].volumes[0]"),
             ({"volumes": [f"{tmp_path}/nope:/d"]}, "components[0].volumes[0]"),
             ({"secrets": ["absent"]}, None)]
    for extra, field in cases:
        d = from_dict({"name": "s", "components": [{"name": "c", "image": "i:1", **extra}]})
        errors = []
        for call in (agent.validate, agent.deploy):
            with pytest.raises(ValidationError) as err:
                call(d)
            errors.append((err.value.field, str(err.value)))
        assert errors[0] == errors[1], extra
        if field:
            assert errors[0][0] == field
    other = from_dict({"name": "s", "node": "elsewhere",
                       "components": [{"name": "c", "image": "i:1"}]})
    with pytest.raises(ValidationError, match="'elsewhere' is not this node") as err:
        agent.validate(other)
    assert err.value.field == "node"


def test_validate_in_fleet_mode_checks_this_node_and_says_so(etcd_cluster: EtcdCluster,
                                                             tmp_path: Path) -> None:
    """One node's checks (secrets the fleet's); the node a placement picks later may be
    another, which a warning names."""
    cfg = config_from_dict({
        "state": {"dir": str(tmp_path / "c1")},
        "podman": {"volume_roots": [str(tmp_path)]},
        "cluster": {"etcd": etcd_cluster.endpoints, "node": "c1", "roles": ["compute"],
                    "lease_ttl_s": 2, "grace_s": 1, "memory_mb": 1024, "timeout_s": 1}})
    ops = FleetOperations(node_agent(cfg, runtimes=FakeWorld().runtimes()))
    try:
        def d(**extra: object) -> ServiceDef:
            return from_dict({"name": "s", "components": [{"name": "c", "image": "i:1",
                                                           **extra}], **top})

        top: dict[str, object] = {"node": "c1"}
        assert ops.validate(d()) == {"service": "s", "valid": True, "components": 1,
                                     "warnings": [], "checked_by": "c1"}
        for extra, words in (({"volumes": ["/etc:/etc"]}, "is outside the volume roots"),
                             ({"secrets": ["absent"]}, "secret 'absent' is not set in the "
                                                       "fleet")):
            with pytest.raises(ValidationError, match=words):
                ops.validate(d(**extra))
        top = {}
        assert ops.validate(d())["warnings"] == [
            "checked on c1 only: the fleet may place it on another node, whose host paths "
            "and capacity were not checked"]
        assert ops.ps() == []
    finally:
        ops.close()
