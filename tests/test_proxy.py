"""Caddy router: JSON builders as unit tests, admin API behaviour against real Caddy."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from edge_env import Caddy, TestCA, free_port

from mcp_node.errors import ProxyError
from mcp_node.proxy import (
    SERVER,
    CaddyRouter,
    ProxyRoute,
    build_cert_entry,
    build_route,
    build_server,
    cert_id,
    dial,
    make_router,
    parse_route,
    route_id,
)

R = ProxyRoute(hostname="www.example.net", backend_address="100.64.0.2", backend_port=8443,
               backend_hostname="app.svc.example.test", cert_file="/c/www.1a.crt",
               key_file="/c/www.1a.key")


def test_build_route_tls_to_backend_with_sni_and_ca() -> None:
    obj = build_route(R, "/etc/backend-ca.pem")
    assert obj == {
        "@id": "mcp-edge-route-www.example.net",
        "match": [{"host": ["www.example.net"]}],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": "100.64.0.2:8443"}],
            "transport": {"protocol": "http", "tls": {
                "server_name": "app.svc.example.test",
                "root_ca_pem_files": ["/etc/backend-ca.pem"]}},
            "headers": {"request": {"set": {"Host": ["app.svc.example.test"]}}},
        }],
        "terminal": True,
    }


def test_build_route_without_ca_uses_system_trust_but_still_tls() -> None:
    tls = build_route(R)["handle"][0]["transport"]["tls"]
    assert tls == {"server_name": "app.svc.example.test"}
    assert "insecure_skip_verify" not in json.dumps(build_route(R))


def test_dial_brackets_ipv6() -> None:
    assert dial("fd7a:115c:a1e0::2", 443) == "[fd7a:115c:a1e0::2]:443"
    assert dial("100.64.0.2", 443) == "100.64.0.2:443"


def test_cert_entry_and_server_block() -> None:
    assert build_cert_entry(R) == {"@id": cert_id(R.hostname), "certificate": R.cert_file,
                                   "key": R.key_file, "tags": ["mcp-edge"]}
    srv = build_server(8443)
    assert srv["listen"] == [":8443"] and srv["automatic_https"] == {"disable": True}
    assert srv["tls_connection_policies"] == [{}]


def test_parse_route_roundtrip_and_foreign_objects() -> None:
    v6 = ProxyRoute(**{**R.__dict__, "backend_address": "fd7a:115c:a1e0::2"})
    for r in (R, v6):
        certs = {r.hostname: build_cert_entry(r)}
        assert parse_route(build_route(r, "/ca.pem"), certs) == r
    assert parse_route({"@id": "someone-else", "handle": []}, {}) is None
    assert parse_route({"match": [{"host": ["x"]}]}, {}) is None


def test_paths_carry_the_serial(tmp_path: Path) -> None:
    router = CaddyRouter("http://127.0.0.1:1", 443, tmp_path)
    assert router.cert_path("a.example.net", "1f") == tmp_path / "a.example.net.1f.crt"
    assert router.key_path("a.example.net", "1f") == tmp_path / "a.example.net.1f.key"
    assert router.cert_path("a.example.net", "1f") != router.cert_path("a.example.net", "20")


def test_bad_backend_or_url_refused(tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match="unsupported"):
        make_router("nginx", "http://127.0.0.1:1", 443, tmp_path)
    with pytest.raises(ProxyError, match="http"):
        CaddyRouter("file:///etc/passwd", 443, tmp_path)


# -- real Caddy ------------------------------------------------------------------------

@pytest.fixture
def certfiles(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = TestCA("proxy-test").leaf(["www.example.net", "api.example.net"])
    (tmp_path / "c.crt").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(key)
    return tmp_path / "c.crt", tmp_path / "c.key"


def _route(host: str, files: tuple[Path, Path], port: int = 8443) -> ProxyRoute:
    return ProxyRoute(hostname=host, backend_address="100.64.0.2", backend_port=port,
                      backend_hostname="app.svc.example.test", cert_file=str(files[0]),
                      key_file=str(files[1]))


def test_add_list_update_remove(caddy: Caddy, tmp_path: Path,
                                certfiles: tuple[Path, Path]) -> None:
    ca = tmp_path / "backend-ca.pem"
    ca.write_bytes(TestCA("backend").pem)
    router = CaddyRouter(caddy.admin_url, caddy.https_port, tmp_path, backend_ca=str(ca))
    assert router.list_routes() == {}
    a, b = _route("www.example.net", certfiles), _route("api.example.net", certfiles)
    router.add_route(a)
    router.add_route(b)
    assert router.list_routes() == {a.hostname: a, b.hostname: b}
    cfg = caddy.config()
    routes = cfg["apps"]["http"]["servers"][SERVER]["routes"]
    assert [r["@id"] for r in routes] == [route_id(a.hostname), route_id(b.hostname)]

    # identical add: reads only, nothing written
    before = router.admin_calls
    router.add_route(a)
    assert router.admin_calls - before == 2
    assert caddy.config() == cfg

    # update: O(1) calls, replaced in place (no append, order kept)
    moved = _route("www.example.net", certfiles, port=9443)
    before = router.admin_calls
    router.add_route(moved)
    assert router.admin_calls - before == 3  # GET route, GET cert, PATCH route
    routes = caddy.config()["apps"]["http"]["servers"][SERVER]["routes"]
    assert len(routes) == 2 and routes[0]["handle"][0]["upstreams"] == [
        {"dial": "100.64.0.2:9443"}]

    assert router.remove_route(a.hostname) is True
    assert router.remove_route(a.hostname) is False
    assert router.list_routes() == {b.hostname: b}
    files = caddy.config()["apps"]["tls"]["certificates"]["load_files"]
    assert [f["@id"] for f in files] == [cert_id(b.hostname)]


def test_rejected_route_rolls_back_cert_entry(caddy: Caddy, tmp_path: Path,
                                              certfiles: tuple[Path, Path]) -> None:
    """Caddy refuses the route (missing backend CA file): no certificate entry stays behind."""
    router = CaddyRouter(caddy.admin_url, caddy.https_port, tmp_path,
                         backend_ca=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ProxyError, match="HTTP 500"):
        router.add_route(_route("www.example.net", certfiles))
    assert router.list_routes() == {}
    assert caddy.config()["apps"]["tls"]["certificates"]["load_files"] == []


def test_keeps_foreign_config(caddy: Caddy, tmp_path: Path,
                              certfiles: tuple[Path, Path]) -> None:
    """A Caddy already serving other things: our server is added beside them, not over them."""
    other = {"listen": [f"127.0.0.1:{free_port()}"],
             "routes": [{"handle": [{"handler": "static_response", "body": "other"}]}]}
    req = urllib.request.Request(f"{caddy.admin_url}/config/apps",
                                 data=json.dumps({"http": {"servers": {"other": other}}}).encode(),
                                 method="PUT", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
    router = CaddyRouter(caddy.admin_url, caddy.https_port, tmp_path)
    router.add_route(_route("www.example.net", certfiles))
    servers = caddy.config()["apps"]["http"]["servers"]
    assert set(servers) == {"other", SERVER}
    assert servers["other"]["routes"] == other["routes"]


def test_caddy_down_is_proxy_error(tmp_path: Path, certfiles: tuple[Path, Path]) -> None:
    router = CaddyRouter(f"http://127.0.0.1:{free_port()}", 443, tmp_path)
    with pytest.raises(ProxyError, match="unreachable"):
        router.ping()
    with pytest.raises(ProxyError, match="unreachable"):
        router.add_route(_route("www.example.net", certfiles))


def test_add_routes_batch_is_constant_calls(caddy: Caddy, tmp_path: Path,
                                            certfiles: tuple[Path, Path]) -> None:
    router = CaddyRouter(caddy.admin_url, caddy.https_port, tmp_path)
    small = [_route(f"s{i}.example.net", certfiles) for i in range(2)]
    big = [_route(f"b{i}.example.net", certfiles) for i in range(40)]
    before = router.admin_calls
    router.add_routes(small)
    first = router.admin_calls - before  # includes creating the skeleton
    before = router.admin_calls
    router.add_routes(big)
    assert router.admin_calls - before <= first
    assert router.list_routes() == {r.hostname: r for r in small + big}
    # partly present: the changed one is replaced in place, nothing duplicated
    moved = _route("s0.example.net", certfiles, port=9443)
    router.add_routes([moved, small[1]])
    got = router.list_routes()
    assert got["s0.example.net"] == moved and len(got) == 42
    routes = caddy.config()["apps"]["http"]["servers"][SERVER]["routes"]
    assert len({r["@id"] for r in routes}) == len(routes) == 42
