"""Node routes, pure parts (issue 11): the Caddy plan, the HAProxy config, the RFC 2136
messages, the route rules (on a real SQLite registry, no proxy contacted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcp_node import nodeproxy
from mcp_node.config import from_dict as config_from_dict
from mcp_node.dnsupdate import (
    DNSUpdateError,
    read_secret,
    register_message,
    unregister_message,
)
from mcp_node.errors import ConflictError, ValidationError
from mcp_node.l4proxy import L4Route, render
from mcp_node.nodeproxy import L7Route, plan
from mcp_node.noderoutes import NodeRoutes
from mcp_node.registry import Registry
from mcp_node.servicedef import ServiceDef
from mcp_node.servicedef import from_dict as service_from_dict

ADDR = "100.64.1.1"
R1 = L7Route(8443, "a.svc.test", 10001)
R2 = L7Route(8443, "b.svc.test", 10002)
CERTS = {"a.svc.test": ("/c/a.1.crt", "/c/a.1.key"), "b.svc.test": ("/c/b.1.crt", "/c/b.1.key")}


def applied(routes: list[L7Route]) -> dict[str, object]:
    """The apps tree Caddy holds once ``plan`` from empty has been applied."""
    [(method, path, body)] = plan({}, ADDR, routes, {r.hostname: CERTS[r.hostname]
                                                    for r in routes})
    assert (method, path) == ("PUT", "/config/apps")
    assert isinstance(body, dict)
    return body


def test_plan_from_empty_is_one_put_listening_on_the_advertised_address_only() -> None:
    apps = applied([R1, R2])
    server = apps["http"]["servers"]["mcp_node_8443"]  # type: ignore[index]
    assert server["listen"] == [f"{ADDR}:8443"]
    assert [r["match"][0]["host"] for r in server["routes"]] == [["a.svc.test"], ["b.svc.test"]]
    assert server["routes"][0]["handle"][0]["upstreams"] == [{"dial": "127.0.0.1:10001"}]
    assert server["automatic_https"] == {"disable": True}
    assert plan(apps, ADDR, [R1, R2], CERTS) == []          # in step: nothing to do
    assert plan({}, ADDR, [], {}) == []


def test_plan_changes_are_single_calls_on_their_own_objects() -> None:
    apps = applied([R1])
    # another hostname on the same port: its certificate, then one route append
    calls = plan(apps, ADDR, [R1, R2], CERTS)
    assert [(m, p) for m, p, _ in calls] == [
        ("POST", "/config/apps/tls/certificates/load_files/..."),
        ("POST", "/config/apps/http/servers/mcp_node_8443/routes")]
    # a new host port (redeploy): one PATCH of that route by id
    moved = L7Route(8443, "a.svc.test", 10009)
    [(m, p, body)] = plan(apps, ADDR, [moved], {"a.svc.test": CERTS["a.svc.test"]})
    assert (m, p) == ("PATCH", "/id/mcp-node-route-8443-a.svc.test")
    assert body["handle"][0]["upstreams"] == [{"dial": "127.0.0.1:10009"}]
    # everything gone: route's server and certificate deleted, nothing else touched
    apps["http"]["servers"]["other"] = {"listen": [":1"]}  # type: ignore[index]
    assert [(m, p) for m, p, _ in plan(apps, ADDR, [], {})] == [
        ("DELETE", "/config/apps/http/servers/mcp_node_8443"),
        ("DELETE", "/id/mcp-node-cert-a.svc.test")]


def test_plan_beside_edge_config_adds_only_our_server() -> None:
    edge_apps = {"http": {"servers": {"mcp_edge": {"listen": [":443"], "routes": []}}},
                 "tls": {"certificates": {"load_files": [{"@id": "mcp-edge-cert-x"}]}}}
    calls = plan(edge_apps, ADDR, [R1], CERTS)
    assert [(m, p) for m, p, _ in calls] == [
        ("POST", "/config/apps/tls/certificates/load_files/..."),
        ("PUT", "/config/apps/http/servers/mcp_node_8443")]
    assert nodeproxy.served(applied([R1, R2])) == {(8443, "a.svc.test"): 10001,
                                                   (8443, "b.svc.test"): 10002}


def test_haproxy_config_is_tcp_passthrough_on_the_address() -> None:
    text = render([L4Route(9000, ADDR, 10005, "s/c/r"), L4Route(5432, "fd7a:115c:a1e0::1",
                                                                 10006)])
    assert "mode tcp" in text and "hard-stop-after" in text
    assert text.index("mcp_l4_5432") < text.index("mcp_l4_9000")   # stable order
    assert f"bind ipv4@{ADDR}:9000" in text and "bind ipv6@fd7a:115c:a1e0::1:5432" in text
    assert "server c10005 127.0.0.1:10005" in text
    assert "ssl" not in text   # passed through, never terminated


def test_dns_messages_use_prerequisites_and_absolute_names() -> None:
    reg = register_message("svc.test", "a.svc.test", ADDR, "node1").to_text()
    assert "a.svc.test. NONE A" in reg              # only if no address is registered
    assert f"a.svc.test. 60 IN A {ADDR}" in reg
    assert '"mcp-node=node1"' in reg
    v6 = register_message("svc.test", "a.svc.test", "fd7a:115c:a1e0::1", "n").to_text()
    assert "NONE AAAA" in v6
    unreg = unregister_message("svc.test", "a.svc.test", ADDR, "node1").to_text()
    assert f"a.svc.test. 0 NONE A {ADDR}" in unreg  # exactly our record, no other
    assert "a.svc.test.svc.test" not in reg + unreg


def test_tsig_secret_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("c2VjcmV0\n")
    f.chmod(0o644)
    with pytest.raises(DNSUpdateError, match="0644; it must be 0600"):
        read_secret(str(f))
    f.chmod(0o600)
    assert read_secret(str(f)) == b"secret"
    f.write_text("not base64!")
    with pytest.raises(DNSUpdateError, match="base64"):
        read_secret(str(f))


def test_config_keys() -> None:
    cfg = config_from_dict({"node": {"advertise": ADDR}, "proxy": {"low_ports": [443]}})
    assert cfg.node.advertise == ADDR and cfg.proxy.low_ports == (443,)
    bad_cases: list[tuple[dict[str, Any], str]] = [
                       ({"node": {"advertise": "eth0"}}, "node.advertise"),
                       ({"proxy": {"low_ports": [8080]}}, "proxy.low_ports"),
                       ({"proxy": {"l4": "nginx"}}, "proxy.l4"),
                       ({"dns": {"update_server": "127.0.0.1:53"}}, "dns.update_server"),
                       ({"dns": {"tsig_algorithm": "rot13"}}, "dns.tsig_algorithm")]
    for bad, field in bad_cases:
        with pytest.raises(ValidationError) as err:
            config_from_dict(bad)
        assert err.value.field == field


def _svc(name: str, routes: list[dict[str, object]]) -> ServiceDef:
    return service_from_dict({"name": name, "components": [
        {"name": "web", "image": "localhost/x:1", "routes": routes}]})


def test_route_rules(tmp_path: Path) -> None:
    cfg = config_from_dict({"state": {"dir": str(tmp_path)}, "edge": {"internal_zone": "svc.test"},
                            "proxy": {"serve_routes": True, "low_ports": [443]}})
    reg = Registry(tmp_path / "registry.db")
    nr = NodeRoutes(cfg, reg, "node1")
    nr.check(_svc("ok", [{"port": 443}]))              # default name, allowed low port
    cases: list[tuple[list[dict[str, object]], str, str]] = [
        ([{"port": 8443, "hostname": "x.example.net"}], "hostname", "internal zone"),
        ([{"port": 80}], "port", "proxy.low_ports"),
        ([{"port": cfg.acme.http01_port + 1000, "name": "a"},
          {"port": cfg.acme.http01_port + 1000, "name": "b"}], "port", "clashes"),
    ]
    for routes, field, words in cases:
        with pytest.raises(ValidationError) as err:
            nr.check(_svc("bad", routes))
        assert err.value.field is not None and err.value.field.endswith(field), err.value
        assert words in str(err.value)
    reg.put_service(_svc("first", [{"port": 9000, "mode": "l4"}]))
    with pytest.raises(ConflictError, match="service 'first'"):
        nr.check(_svc("second", [{"port": 9000}]))
    nr.check(_svc("first", [{"port": 9000}]))          # its own routes never clash
    reg.close()
