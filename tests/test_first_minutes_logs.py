"""Issue 22 rows 9, 10 and 11, each with its exact output and exit code: a new service
on a fleet with one node down (a real etcd, two agents over HTTP), follows that survive
a replace and an agent restart, and ``mcp logs SERVICE`` of every component at once
(real podman)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from etcd_env import EtcdCluster
from test_cluster_fleet import Node

from mcp_node import fence
from mcp_node.cli import cli
from mcp_node.server import AgentServer, serve


@pytest.fixture
def two_fleet_nodes(etcd_cluster: EtcdCluster, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, AgentServer]]:
    """Two fleet agents (real etcd, in-memory workloads) served over HTTP, both named in
    mcp.toml as [[nodes]]: the fleet an operator's CLI sees."""
    nodes = {n: Node(n, tmp_path, etcd_cluster.endpoints, ["compute"]) for n in ("n1", "n2")}
    servers: dict[str, AgentServer] = {}
    try:
        lines = []
        for name, node in nodes.items():
            agent = node.start()
            cfg = replace(node.cfg, server=replace(node.cfg.server, listen="127.0.0.1:0"))
            servers[name] = srv = serve(agent, cfg)
            lines.append(f'[[nodes]]\nname = "{name}"\naddress = "{srv.url}"\n'
                         f'token_path = "{srv.token_file}"\n')
        conf = tmp_path / "mcp.toml"
        conf.write_text("".join(lines))
        monkeypatch.setenv("MCP_CLI_CONFIG", str(conf))
        yield servers
    finally:
        for srv in servers.values():
            with contextlib.suppress(OSError):   # stopped by the test already
                srv.shutdown()
                srv.server_close()
        for node in nodes.values():
            if node.agent is not None:
                node.agent.close()
            pid = fence.fence_pid(node.cfg.state_dir)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_row9_a_new_service_with_a_node_down_gets_the_hint_and_the_node(
        two_fleet_nodes: dict[str, AgentServer], tmp_path: Path) -> None:
    svc = tmp_path / "newsvc.toml"
    svc.write_text('name = "newsvc"\n[[components]]\nname = "web"\nimage = "img:v1"\n')
    r = CliRunner().invoke(cli, ["deploy", str(svc)])
    assert (r.exit_code, r.stderr) == (
        1, "Error: unknown service 'newsvc' on nodes n1, n2; deploy it with -n NODE\n")
    down = two_fleet_nodes["n2"]
    down.shutdown()
    down.server_close()
    r = CliRunner().invoke(cli, ["deploy", str(svc)])
    assert (r.exit_code, r.stdout) == (1, "")
    assert r.stderr == (
        "Error: unknown service 'newsvc' on node n1; not reachable: n2; deploy it with "
        "-n NODE (n2 may have it: check once it answers)\n"
        f"  node n2: the agent is not reachable at {down.url}: [Errno 111] Connection "
        "refused; is mcp-agent running there? (start it with `mcp-agent`, or point "
        "--agent, $MCP_AGENT or the [[nodes]] of mcp.toml at it)\n")
