"""Edge routes through the agent: HTTP API roles, `mcp edge ...` and `mcp node health`
against a live agent (real podman, Caddy, Pebble, dnsmasq and the netns backend)."""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from edge_env import (
    BACKEND_BODY,
    BACKEND_HOST,
    Caddy,
    Dnsmasq,
    NetnsBackend,
    Pebble,
    https_get,
    make_edge_config,
)

from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.client import Client
from mcp_node.config import AgentConfig, ServerConfig
from mcp_node.errors import RemoteError
from mcp_node.server import AgentServer, serve


@dataclass
class EdgeLive:
    cfg: AgentConfig
    agent: Agent
    server: AgentServer
    caddy: Caddy
    backend: NetnsBackend
    root: Path
    tmp: Path

    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, role: str) -> str:
        if role not in self.tokens:
            self.tokens[role] = self.server.tokens.add(
                f"{role}-{uuid.uuid4().hex[:6]}", role)
        return self.tokens[role]

    def client(self, role: str) -> Client:
        return Client(self.server.url, self.token(role), timeout=60)

    def mcp(self, role: str, *args: str) -> Result:
        tf = self.tmp / f"{role}.token"
        if not tf.exists():
            tf.write_text(self.token(role))
            tf.chmod(0o600)
        return CliRunner().invoke(cli, ["--agent", self.server.url, "--token-file", str(tf),
                                        *args], catch_exceptions=False)


def _start(cfg: AgentConfig, monitor: bool = False) -> tuple[Agent, AgentServer]:
    agent = Agent(cfg, monitor=monitor)
    return agent, serve(agent, cfg)


@pytest.fixture
def edge_live(tmp_path: Path, podman_config: AgentConfig, podman_cleanup: Any, caddy: Caddy,
              pebble: Pebble, edge_dns: Dnsmasq,
              netns_backend: NetnsBackend) -> Iterator[EdgeLive]:
    edge_cfg = make_edge_config(podman_config.state_dir, caddy, pebble, edge_dns,
                                netns_backend.ca_file)
    cfg = replace(podman_config, server=ServerConfig(listen="127.0.0.1:0"),
                  proxy=edge_cfg.proxy, acme=edge_cfg.acme, dns=edge_cfg.dns,
                  edge=edge_cfg.edge)
    agent, srv = _start(cfg)
    podman_cleanup.add(agent.owner)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    live = EdgeLive(cfg, agent, srv, caddy, netns_backend, root, tmp_path)
    try:
        yield live
    finally:
        live.server.shutdown()
        live.agent.close()


def _body(live: EdgeLive, host: str) -> dict[str, Any]:
    return {"hostname": host, "backend_hostname": BACKEND_HOST,
            "backend_port": live.backend.port}


@pytest.mark.parametrize("role", ["reader", "operator"])
def test_mutations_need_master(edge_live: EdgeLive, role: str) -> None:
    c = edge_live.client(role)
    with pytest.raises(RemoteError) as err:
        c.post("/v1/edge-routes", _body(edge_live, "www.example.net"))
    assert err.value.status == 403
    with pytest.raises(RemoteError) as err:
        c.delete("/v1/edge-routes/www.example.net")
    assert err.value.status == 403
    assert c.get("/v1/edge-routes") == []
    assert edge_live.agent.registry.list_edge_routes() == []
    assert "apps" not in edge_live.caddy.config()


def test_bad_requests_over_http(edge_live: EdgeLive) -> None:
    c = edge_live.client("master")
    with pytest.raises(RemoteError) as err:
        c.post("/v1/edge-routes", {**_body(edge_live, "www.example.net"), "backend_tls": False})
    assert err.value.status == 400 and "no cleartext" in str(err.value)
    with pytest.raises(RemoteError) as err:
        c.post("/v1/edge-routes", {**_body(edge_live, "www.example.net"),
                                   "backend_hostname": "lan.svc.example.test"})
    assert err.value.status == 400 and "10.0.0.5" in str(err.value)
    with pytest.raises(RemoteError) as err:
        c.delete("/v1/edge-routes/nothere.example.net")
    assert err.value.status == 404
    assert c.get("/v1/edge-routes") == []


def test_cli_setup_list_remove_matches_served_cert(edge_live: EdgeLive) -> None:
    host = "cli.example.net"
    res = edge_live.mcp("master", "edge", "setup", host,
                        f"{BACKEND_HOST}:{edge_live.backend.port}")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"edge route {host} -> {BACKEND_HOST}:")
    status, body, served = https_get(edge_live.caddy.https_port, host, edge_live.root)
    assert status == 200 and body.startswith(BACKEND_BODY)

    res = edge_live.mcp("reader", "--json", "edge", "list")
    assert res.exit_code == 0, res.output
    [row] = json.loads(res.output)
    assert row["hostname"] == host
    assert row["cert_serial"] == format(served.serial_number, "x")
    assert row["cert_expires"] == served.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    table = edge_live.mcp("reader", "edge", "list").output
    assert row["cert_serial"] in table and host in table

    res = edge_live.mcp("operator", "edge", "remove", host)
    assert res.exit_code == 1 and "needs master" in res.output
    assert [r["hostname"] for r in edge_live.client("reader").get("/v1/edge-routes")] == [host]
    res = edge_live.mcp("master", "edge", "remove", host)
    assert res.exit_code == 0, res.output
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(edge_live.caddy.https_port, host, edge_live.root)
    assert json.loads(edge_live.mcp("reader", "--json", "edge", "list").output) == []
    assert list((edge_live.cfg.state_dir / "edge" / "certs").glob(f"{host}.*")) == []


def _health(live: EdgeLive) -> dict[str, Any]:
    res = live.mcp("reader", "--json", "node", "health")
    assert res.output, res
    [h] = json.loads(res.output)   # one entry per node, always a list
    assert res.exit_code == (0 if h["status"] == "healthy" else 3), res
    return dict(h)


def test_node_health_degrades_when_caddy_down(edge_live: EdgeLive) -> None:
    edge_live.client("master").post("/v1/edge-routes", _body(edge_live, "hc.example.net"))
    h = _health(edge_live)
    assert h["status"] == "healthy", h["reasons"]
    assert h["edge_routes"] == 1
    edge_live.caddy.stop()
    deadline = time.monotonic() + 20  # the agent caches health for a short while
    while (h := _health(edge_live))["status"] == "healthy" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["status"] == "degraded"
    assert any(r.startswith("edge proxy unreachable") for r in h["reasons"]), h["reasons"]


def test_restarted_caddy_and_agent_serve_again(edge_live: EdgeLive) -> None:
    host = "again.example.net"
    edge_live.client("master").post("/v1/edge-routes", _body(edge_live, host))
    edge_live.server.shutdown()
    edge_live.agent.close()
    edge_live.caddy.stop()
    edge_live.caddy.start()  # empty
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(edge_live.caddy.https_port, host, edge_live.root)
    edge_live.agent, edge_live.server = _start(edge_live.cfg, monitor=True)
    status, body, _ = https_get(edge_live.caddy.https_port, host, edge_live.root)
    assert status == 200 and body.startswith(BACKEND_BODY)
    rows = edge_live.client("reader").get("/v1/edge-routes")
    assert [r["hostname"] for r in rows] == [host]
