"""The `mcp` CLI with CliRunner: exact output and exit codes of every command, against
a real agent (HTTP server in-process, real podman), and with --local."""

from __future__ import annotations

import json
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from podman_env import wait_http

from mcp_node import __version__
from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.cliedge import split_backend
from mcp_node.cliformat import fmt_uptime, status_text, table
from mcp_node.config import AgentConfig, ServerConfig
from mcp_node.server import AgentServer

PS_HEADER = "SERVICE  COMPONENT  NODE  RUNTIME  STATE  VERSION  UPTIME  PORTS"


@dataclass
class Live:
    agent: Agent
    url: str
    token_file: Path
    server: AgentServer

    def mcp(self, *args: str, token: bool = True) -> Result:
        base = ["--agent", self.url]
        if token:
            base += ["--token-file", str(self.token_file)]
        return CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)


@pytest.fixture
def live(podman_config: AgentConfig, podman_cleanup: object) -> Iterator[Live]:
    from mcp_node.server import serve

    cfg = replace(podman_config, server=ServerConfig(listen="127.0.0.1:0"))
    agent = Agent(cfg)
    podman_cleanup.add(agent.owner)  # type: ignore[attr-defined]
    srv = serve(agent, cfg)
    try:
        assert srv.token_file is not None
        yield Live(agent, srv.url, srv.token_file, srv)
    finally:
        srv.shutdown()
        agent.close()


def definition(tmp_path: Path, svc: str, image: str) -> Path:
    path = tmp_path / f"{svc}.toml"
    path.write_text(f'name = "{svc}"\n[[components]]\nname = "web"\nimage = "{image}"\n'
                    'env = ["MESSAGE=cli"]\n[[components.routes]]\nport = 8080\n')
    return path


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"mcp, version {__version__}\n"


def test_usage_errors_exit_2() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["logs"]).exit_code == 2
    assert runner.invoke(cli, ["bogus"]).exit_code == 2
    result = runner.invoke(cli, ["edge", "setup", "a.example.net", "nohostport"])
    assert result.exit_code == 2 and "is not HOST:PORT" in result.output
    assert runner.invoke(cli, ["logs", "x", "--tail", "-3"]).exit_code == 2


def test_unreachable_agent_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        result = CliRunner().invoke(cli, ["--agent", url, "ps"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: the agent is not reachable at {url}: [Errno 111] Connection refused; is "
        "mcp-agent running there? (start it with `mcp-agent`, or point --agent, $MCP_AGENT or "
        "the [[nodes]] of mcp.toml at it)\n")


def test_validation_error_before_any_call_exit_1(tmp_path: Path) -> None:
    """Checked in-process: the (unreachable) agent is never asked."""
    invalid = tmp_path / "bad.toml"
    invalid.write_text('name = "x"\n[[components]]\nname = "web"\nimage = "i"\nenv = ["1BAD"]\n')
    res = CliRunner().invoke(cli, ["--agent", "http://127.0.0.1:9", "deploy", str(invalid)])
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr == "Error: components[0].env[0]: '1BAD' is not KEY=VALUE\n"
    bad_name = CliRunner().invoke(cli, ["--agent", "http://127.0.0.1:9", "deploy", "a,b"])
    assert (bad_name.exit_code, bad_name.stdout) == (1, "")
    assert bad_name.stderr.startswith("Error: service: 'a,b' is not a valid name")


def test_usage_error_is_clicks_not_ours() -> None:
    res = CliRunner().invoke(cli, ["edge", "setup", "a.example.net", "nohostport"])
    assert (res.exit_code, res.stdout) == (2, "")
    assert res.stderr.startswith("Usage: cli edge setup [OPTIONS] HOSTNAME BACKEND")
    assert res.stderr.endswith(
        "Error: Invalid value for BACKEND_HOST:PORT: 'nohostport' is not HOST:PORT\n")


def test_status_text_shows_runtime_keys_generically() -> None:
    common = {"service": "s", "node": "n1", "state": "running", "desired_state": "running",
              "version": "v1", "uptime_s": 5, "routes": [], "image": "i", "drift": False,
              "flapping": False}
    st = {"service": "s", "node": "n1", "active": True, "drift": False, "flapping": False,
          "events": [], "components": [
              {**common, "component": "web", "runtime": "rt-a"},
              {**common, "component": "vm", "runtime": "rt-b", "vcpus": 2, "pid": None,
               "accel": "tcg", "builder": "", "ports": [1, 2], "kvm": True}]}
    assert status_text(st).splitlines() == [
        "service s on n1: active",
        "COMPONENT  RUNTIME  STATE    DESIRED  VERSION  UPTIME  RESTARTS  PORTS  DRIFT",
        "web        rt-a     running  running  v1       5s      0         -      no",
        "vm         rt-b     running  running  v1       5s      0         -      no",
        "  vm: accel=tcg builder=- kvm=yes pid=- ports=1,2 vcpus=2",
    ]
    looping = {**common, "component": "web", "runtime": "rt-a", "state": "backoff",
               "drift": True, "restarts": 3, "exit_code": 3, "ready": False,
               "next_attempt": "2026-11-29T15:00:04Z", "spec_drift": False}
    st["components"] = [looping, {**common, "component": "old", "runtime": "rt-a",
                                  "spec_drift": True, "drift": False, "restarts": 0}]
    assert status_text(st).splitlines()[2:] == [
        "web        rt-a     backoff  running  v1       -       3         -      yes",
        "old        rt-a     running  running  v1       5s      0         -      spec",
        "  web: last exit code 3, next attempt 2026-11-29T15:00:04Z",
    ]


def test_full_lifecycle_output(live: Live, tmp_path: Path, hello_image: str) -> None:
    svc = f"c{uuid.uuid4().hex[:8]}"
    node = live.agent.node

    empty = live.mcp("ps")
    assert empty.exit_code == 0 and empty.output == PS_HEADER + "\n"

    deployed = live.mcp("deploy", str(definition(tmp_path, svc, hello_image)), "--direct")
    assert deployed.exit_code == 0, deployed.output
    lines = deployed.output.splitlines()
    assert lines[0] == f"deployed {svc}"
    assert lines[1] == f"service {svc} on {node}: active"

    ps = live.mcp("ps")
    header, row = ps.output.splitlines()
    assert header.split() == PS_HEADER.split()
    assert row.split()[:6] == [svc, "web", node, "container", "running", "v1"]

    rows = json.loads(live.mcp("--json", "ps").output)
    assert [set(r) for r in rows] == [{"service", "component", "node", "runtime", "state",
                                       "desired_state", "version", "uptime_s", "routes"}]
    after = json.loads(live.mcp("ps", "--json").output)  # --json after the command too
    assert [{**r, "uptime_s": 0} for r in after] == [{**r, "uptime_s": 0} for r in rows]
    port = rows[0]["routes"][0]["host_port"]
    assert set(rows[0]["routes"][0]) == {"name", "port", "mode", "hostname", "host_port"}
    assert wait_http(port) == "hello from cli\n"

    status = live.mcp("status", svc)
    assert status.exit_code == 0
    assert status.output.splitlines()[0] == f"service {svc} on {node}: active"
    assert f"127.0.0.1:{port}" in status.output
    st = json.loads(live.mcp("--json", "status", svc).output)
    assert st["drift"] is False and st["components"][0]["state"] == "running"

    summary = live.mcp("status")
    width = max(4, len(node))
    assert summary.output.splitlines() == [
        f"{'SERVICE'.ljust(len(svc))}  {'NODE'.ljust(width)}  RUNNING  DRIFT",
        f"{svc}  {node.ljust(width)}  1/1      no",
    ]

    logs = live.mcp("logs", svc, "web", "--tail", "5")
    assert logs.exit_code == 0 and "GET / HTTP" in logs.output

    assert live.mcp("stop", svc).output == f"stopped {svc}\n"
    assert live.mcp("--json", "ps").output.count('"stopped"') == 2  # state and desired
    started = live.mcp("start", svc)
    assert started.exit_code == 0 and started.output.splitlines()[0] == f"started {svc}"
    assert live.mcp("restart", svc).output.splitlines()[0] == f"restarted {svc}"
    assert wait_http(port) == "hello from cli\n"

    health = live.mcp("node", "health")
    assert health.exit_code == 0
    assert health.output.splitlines()[:3] == ["status: healthy", f"node: {node}",
                                              "containers: 1"]

    assert live.mcp("undeploy", svc).output == f"undeployed {svc}\n"
    assert live.mcp("ps").output == PS_HEADER + "\n"


def test_operation_errors_exit_1(live: Live, tmp_path: Path) -> None:
    unknown = live.mcp("status", "nosuch")
    msg = "Error: unknown service 'nosuch' (no services deployed)\n"
    assert unknown.exit_code == 1 and unknown.output == msg
    assert (unknown.stdout, unknown.stderr) == ("", msg)
    reader = tmp_path / "reader-token"
    reader.write_text(live.server.tokens.add("viewer", "reader"))
    reader.chmod(0o600)
    base = ["--agent", live.url, "--token-file", str(reader)]
    forbidden = CliRunner().invoke(cli, [*base, "stop", "nosuch"])
    assert (forbidden.exit_code, forbidden.stdout) == (1, "")
    assert forbidden.stderr == (
        f"Error: token 'viewer' has role reader; needs operator (node {live.url}, token from "
        f"{reader}); make an operator token on the node with `mcp-agent token add NAME operator "
        "--output FILE` and pass --token-file FILE\n")
    assert CliRunner().invoke(cli, [*base, "ps"]).stdout == PS_HEADER + "\n"
    bad = live.mcp("stop", "a,b")
    assert bad.exit_code == 1 and "is not a valid name" in bad.output
    missing = live.mcp("deploy", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 1 and "no such file" in missing.output
    invalid = tmp_path / "bad.toml"
    invalid.write_text('name = "x"\n[[components]]\nname = "web"\nimage = "i"\nbogus = 1\n')
    res = live.mcp("deploy", str(invalid))
    assert res.exit_code == 1
    assert res.output == (
        "Error: components[0].bogus: unknown key 'bogus' (known: name, image, cmd, env, "
        "volumes, restart, runtime, memory_mb, vcpus, binary, image_sha256, routes, check, "
        "check_interval_s, check_timeout_s, check_failures, pull, image_digest, secrets, "
        "secret_versions)\n")
    live.token_file.chmod(0o644)
    loose = live.mcp("ps")
    assert loose.exit_code == 1 and "must be 0600" in loose.output
    live.token_file.chmod(0o600)
    noauth = live.mcp("ps", token=False)
    assert noauth.exit_code == 1 and noauth.output.startswith("Error: ")


def test_service_lookup_in_config_dir(live: Live, tmp_path: Path, hello_image: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    svc = f"c{uuid.uuid4().hex[:8]}"
    services = tmp_path / "xdg-config" / "mcp" / "services"
    services.mkdir(parents=True)
    definition(services, svc, hello_image)
    assert live.mcp("deploy", svc).output.splitlines()[0] == f"deployed {svc}"
    assert live.mcp("undeploy", svc).exit_code == 0


def test_nodes_from_cli_config(live: Live, tmp_path: Path) -> None:
    cfg = tmp_path / "xdg-config" / "mcp"
    cfg.mkdir(parents=True)
    (cfg / "mcp.toml").write_text(
        f'token_path = "{live.token_file}"\n'
        f'[[nodes]]\nname = "n1"\naddress = "{live.url.removeprefix("http://")}"\n')
    runner = CliRunner()
    assert runner.invoke(cli, ["-n", "n1", "ps"]).output == PS_HEADER + "\n"
    res = runner.invoke(cli, ["-n", "n2", "ps"])
    assert res.exit_code == 1 and res.output == (
        f"Error: unknown node 'n2' (known: n1); nodes are the [[nodes]] of {cfg / 'mcp.toml'}\n")


def test_local_mode_runs_in_process(podman_config: AgentConfig, tmp_path: Path,
                                    hello_image: str, monkeypatch: pytest.MonkeyPatch,
                                    podman_cleanup: object) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[podman]\nsocket = "{podman_config.podman.socket}"\n'
                    f'[state]\ndir = "{podman_config.state_dir}"\n')
    monkeypatch.setenv("MCP_AGENT_CONFIG", str(conf))
    svc = f"c{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    res = runner.invoke(cli, ["deploy", "--local", str(definition(tmp_path, svc, hello_image))])
    assert res.exit_code == 0, res.output
    agent = Agent(podman_config)
    podman_cleanup.add(agent.owner)  # type: ignore[attr-defined]
    rows = json.loads(runner.invoke(cli, ["--local", "--json", "ps"]).output)
    assert [(r["service"], r["state"]) for r in rows] == [(svc, "running")]
    assert runner.invoke(cli, ["--local", "undeploy", svc]).output == f"undeployed {svc}\n"
    agent.close()


def test_pure_helpers() -> None:
    assert fmt_uptime(5, "running") == "5s"
    assert fmt_uptime(125, "running") == "2m05s"
    assert fmt_uptime(7260, "running") == "2h01m"
    assert fmt_uptime(90000, "running") == "1d01h"
    assert fmt_uptime(5, "stopped") == "-"
    assert table(["A", "BB"], [["xyz", "1"]]) == "A    BB\nxyz  1"
    assert split_backend("b.svc.example.net:8443") == ("b.svc.example.net", 8443)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_complete_real_commands(shell: str) -> None:
    import os
    import shutil
    import subprocess

    res = CliRunner().invoke(cli, ["completion", shell])
    assert res.exit_code == 0 and "_MCP_COMPLETE" in res.stdout
    mcp = shutil.which("mcp", path=str(Path(sys.executable).parent)) or shutil.which("mcp")
    assert mcp is not None, "the mcp entry point is installed beside this python"
    # bash and zsh pass the index of the word being completed, fish the word itself
    env = {**os.environ, "_MCP_COMPLETE": f"{shell}_complete", "COMP_WORDS": "mcp dep",
           "COMP_CWORD": "dep" if shell == "fish" else "1"}
    out = subprocess.run([mcp], env=env, capture_output=True, text=True, timeout=30).stdout
    assert "deploy" in out and "undeploy" not in out
