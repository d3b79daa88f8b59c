"""front.Front: edge routes and component routes share one Caddy client, one ACME
account and one certificate order at a time (two at once would fight over the
HTTP-01 port)."""

from __future__ import annotations

import threading
from pathlib import Path

from edge_env import Pebble
from fake_runtime import FakeWorld

from mcp_node.acme import cert_info
from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.front import Front


def test_agent_edge_and_node_routes_share_one_front(tmp_path: Path) -> None:
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            "acme": {"directory": "https://127.0.0.1:9/dir"}})
    a = Agent(cfg, runtimes=FakeWorld().runtimes())
    try:
        edge, routes = a.edge, a.node_routes
        assert edge.front is routes.front is a.front
        assert edge.router is routes.caddy
        assert edge.issuer is routes.front.issuer
        assert edge.issuer.account_key_path == cfg.state_dir.absolute() / "edge" / "acme" / \
            "account.key"
    finally:
        a.close()


def test_two_orders_at_once_both_issue_on_one_account(pebble: Pebble, tmp_path: Path) -> None:
    """An edge route and a component route ordering at the same instant: each listens on
    the one HTTP-01 port in turn, and both certificates come from the same account."""
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            "acme": {"directory": pebble.directory_url,
                                     "ca_bundle": str(pebble.ca_bundle),
                                     "http01_port": pebble.http01_port}})
    front = Front(cfg)
    out = tmp_path / "certs"
    out.mkdir()
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def order(host: str) -> None:
        start.wait(timeout=10)
        try:
            results[host] = front.issue(host, lambda s: (out / f"{host}.{s}.crt",
                                                         out / f"{host}.{s}.key"))
        except Exception as exc:  # noqa: BLE001 - reported below
            results[host] = exc

    hosts = ["front-a.example.net", "front-b.example.net"]
    threads = [threading.Thread(target=order, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for host in hosts:
        got = results[host]
        assert isinstance(got, tuple), f"{host}: {got!r}"
        cert_file, key_file, info = got
        assert cert_info(cert_file.read_bytes()).serial == info.serial
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert front.issuer._kid is not None
    assert list((tmp_path / "state" / "edge" / "acme").iterdir()) == [
        tmp_path / "state" / "edge" / "acme" / "account.key"]
