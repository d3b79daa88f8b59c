"""What operators watch, over real HTTP against a live agent (runtimes faked):
/metrics read back with prometheus-client's own parser, /v1/livez without a token,
events (list and NDJSON follow), history/rollback and per-component lifecycle over
the API, and health polls logged at debug only."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_runtime import FakeWorld
from prometheus_client.parser import text_string_to_metric_families

from mcp_node.agent import Agent
from mcp_node.cli import cli
from mcp_node.client import Client
from mcp_node.config import from_dict as config_from_dict
from mcp_node.server import AgentServer, serve
from mcp_node.servicedef import from_dict


class Live:
    def __init__(self, tmp_path: Path) -> None:
        self.world = FakeWorld()
        cfg = config_from_dict({"state": {"dir": str(tmp_path / "st")},
                                "server": {"listen": "127.0.0.1:0"}})
        self.agent = Agent(cfg, runtimes=self.world.runtimes())
        self.server: AgentServer = serve(self.agent, cfg)
        assert self.server.token_file is not None
        self.token_file = self.server.token_file
        self.client = Client(self.server.url, self.token_file.read_text().strip())

    def mcp(self, *args: str) -> Any:
        return CliRunner().invoke(cli, ["--agent", self.server.url, "--token-file",
                                        str(self.token_file), *args])

    def raw_get(self, path: str, token: bool = False) -> tuple[int, str, bytes]:
        host, port = self.server.server_address[:2]
        conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
        headers = {"Authorization": f"Bearer {self.client.token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        out = resp.status, resp.getheader("Content-Type") or "", resp.read()
        conn.close()
        return out


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    lv = Live(tmp_path)
    yield lv
    lv.server.shutdown()
    lv.agent.close()


def two(image: str = "img:v1") -> dict[str, Any]:
    return {"name": "shop", "components": [{"name": "web", "image": image},
                                            {"name": "db", "image": "db:v1"}]}


def test_livez_needs_no_token_and_says_only_up(live: Live) -> None:
    status, ctype, body = live.raw_get("/v1/livez")
    assert (status, json.loads(body)) == (200, {"status": "up"})
    assert live.raw_get("/v1/health")[0] == 401          # everything else still needs one


def test_metrics_parse_with_prometheus_client(live: Live) -> None:
    live.client.post("/v1/services", two())
    live.agent.deploy(from_dict(two()))
    assert live.raw_get("/metrics")[0] == 401
    status, ctype, body = live.raw_get("/metrics", token=True)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    comps = {(s.labels["runtime"], s.labels["state"]): s.value
             for s in fams["mcp_components"].samples}
    assert sum(comps.values()) == 2 and all(st == "running" for _, st in comps)
    reqs = [s for s in fams["mcp_http_requests"].samples if s.name == "mcp_http_requests_total"]
    assert any(s.labels == {"method": "POST", "route": "/v1/services", "status": "200"}
               and s.value == 1 for s in reqs)
    assert any(s.labels["route"] == "/v1/livez" for s in reqs) is False   # not asked yet
    deploys = [s for s in fams["mcp_deploy_duration_seconds"].samples
               if s.name == "mcp_deploy_duration_seconds_count"]
    assert [s.value for s in deploys] == [1]
    assert [s.value for s in fams["mcp_node_healthy"].samples] == [1]
    assert "mcp_http_request_duration_seconds" in fams
    assert "mcp_edge_certificate_expiry_timestamp_seconds" in fams
    rollouts = {s.labels["outcome"]: s.value for s in fams["mcp_rollouts"].samples
                if s.name == "mcp_rollouts_total"}
    # one deploy began a rollout (the second was unchanged); none ended: no monitor here
    assert rollouts == {"started": 1, "succeeded": 0, "failed": 0, "reverted": 0}
    # Whole rounds only: a deploy's refresh of its own service is not one.
    rounds, cpu_s, listing_s = live.agent.monitor_cost()
    live.agent.monitor.refresh_safely("shop")
    assert live.agent.monitor_cost() == (rounds, cpu_s, listing_s)
    for _ in range(2):
        live.agent.monitor.refresh_safely()
    now = live.agent.monitor_cost()
    assert now[0] == rounds + 2 and now[1] > cpu_s
    # the listings are a part of the rounds' CPU, counted in the same rounds
    assert listing_s < now[2] and now[2] - listing_s < now[1] - cpu_s
    fams = {f.name: f for f in text_string_to_metric_families(
        live.raw_get("/metrics", token=True)[2].decode())}
    # + 1: with no monitor thread, the scrape's health is judged by a round of its own
    assert [s.value for s in fams["mcp_monitor_rounds"].samples
            if s.name == "mcp_monitor_rounds_total"] == [rounds + 3]
    assert [s.value > 0 for s in fams["mcp_monitor_round_cpu_seconds"].samples
            if s.name == "mcp_monitor_round_cpu_seconds_total"] == [True]
    listed, = [s.value for s in fams["mcp_monitor_listing_cpu_seconds"].samples]
    assert 0 < listed < fams["mcp_monitor_round_cpu_seconds"].samples[0].value


def test_events_list_follow_and_cli(live: Live) -> None:
    live.client.post("/v1/services", two())
    live.agent.monitor.refresh()
    events = live.client.get("/v1/events", params={"service": "shop"})
    assert [(e["component"], e["to"]) for e in events] == [("", "deploy"), ("web", "running"),
                                                            ("db", "running")]
    assert events[1]["time"].endswith("Z") and events[1]["id"] < events[2]["id"]
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        for line in live.client.stream("/v1/events?follow=1&tail=0"):
            for part in line.splitlines():
                if part.strip():
                    got.append(json.loads(part))
            if len(got) >= 1:
                done.set()
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.3)
    live.world.crash("shop", "db", 3)
    live.agent.monitor.refresh()
    assert done.wait(10)
    assert (got[0]["component"], got[0]["from"], got[0]["to"]) == ("db", "running", "stopped")
    res = live.mcp("events", "shop", "--tail", "1")
    assert res.exit_code == 0
    assert res.stdout.endswith("shop/db: running -> stopped\n")
    res = live.mcp("events", "nosuch")
    assert res.exit_code == 1 and "unknown service 'nosuch'" in res.stderr


def test_history_rollback_and_component_lifecycle_over_http(live: Live) -> None:
    live.client.post("/v1/services", two("img:v1"))
    live.client.post("/v1/services", two("img:v2"))
    hist = live.client.get("/v1/services/shop/history")
    assert [h["version"] for h in hist] == [1, 2]
    st = live.client.post("/v1/services/shop/rollback", {})
    assert st["definition"]["components"][0]["image"] == "img:v1"
    res = live.mcp("rollback", "shop", "2")
    assert res.exit_code == 0, res.output
    live.client.post("/v1/services/shop/stop", {"component": "db", "timeout": 1.5})
    assert live.world.stop_timeouts[-1] == 1.5
    assert live.world.workloads[("shop", "web")].state == "running"
    assert live.world.workloads[("shop", "db")].state == "stopped"
    for body, field in (({"timeout": 1}, "body"), ({"component": "Bad"}, "component")):
        with pytest.raises(Exception) as err:
            live.client.post("/v1/services/shop/start", body)
        assert getattr(err.value, "status", None) == 400 and field in str(err.value)
    with pytest.raises(Exception) as err:
        live.client.post("/v1/services/shop/rollback", {"version": 0})
    assert getattr(err.value, "status", None) == 400


def test_health_polls_are_logged_at_debug_only(live: Live,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("http ")]

    with caplog.at_level(logging.INFO, logger="mcp_node.server"):
        live.client.get("/v1/health")
        live.client.get("/v1/services")
        deadline = time.monotonic() + 5   # the line is written after the answer is sent
        while not any("path=/v1/services " in ln for ln in lines()):
            assert time.monotonic() < deadline, lines()
            time.sleep(0.01)
    assert not any("path=/v1/health" in ln for ln in lines())
