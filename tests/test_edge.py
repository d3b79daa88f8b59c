"""EdgeManager: validation rules, and setup/remove/reconcile/health end to end with real
Caddy, Pebble (real HTTP-01), dnsmasq and a TLS backend in a network namespace."""

from __future__ import annotations

import ssl
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from edge_env import (
    BACKEND_BODY,
    BACKEND_HOST,
    INTERNAL_ZONE,
    Caddy,
    Dnsmasq,
    NetnsBackend,
    Pebble,
    free_port,
    https_get,
    make_edge_config,
)

from mcp_node.config import AgentConfig, from_dict
from mcp_node.edge import EdgeManager, under_domain, validate
from mcp_node.errors import (
    DNSCheckError,
    IssuerError,
    NotFoundError,
    ProxyError,
    ValidationError,
)
from mcp_node.proxy import SERVER, cert_id, route_id
from mcp_node.registry import Registry

CFG = from_dict({"edge": {"allowed_domains": ["example.net", "example.org"],
                          "internal_zone": INTERNAL_ZONE}})


@pytest.mark.parametrize(("name", "domain", "ok"), [
    ("example.net", "example.net", True),
    ("x.example.net", "example.net", True),
    ("a.b.example.net", "example.net", True),
    ("X.Example.NET.", "example.net", True),
    ("evilexample.net", "example.net", False),
    ("example.net.evil.com", "example.net", False),
    ("xexample.net", "example.net", False),
    ("net", "example.net", False),
    ("example.net", "", False),
])
def test_label_matching(name: str, domain: str, ok: bool) -> None:
    assert under_domain(name, domain) is ok


def test_validate_accepts_and_normalizes() -> None:
    assert validate(CFG, "WWW.example.org.", f"App.{INTERNAL_ZONE}", 443) == (
        "www.example.org", f"app.{INTERNAL_ZONE}", 443)


@pytest.mark.parametrize(("args", "field", "text"), [
    (("www.example.net", BACKEND_HOST, 443, False), "backend_tls", "no cleartext"),
    (("www.example.net", BACKEND_HOST, 443, "yes"), "backend_tls", "no cleartext"),
    (("evilexample.net", BACKEND_HOST, 443, True), "hostname", "not under an allowed domain"),
    (("www.evil.com", BACKEND_HOST, 443, True), "hostname", "not under an allowed domain"),
    (("*.example.net", BACKEND_HOST, 443, True), "hostname", "not a valid DNS name"),
    (("a..example.net", BACKEND_HOST, 443, True), "hostname", "not a valid DNS name"),
    (("x" * 64 + ".example.net", BACKEND_HOST, 443, True), "hostname", "not a valid DNS"),
    (("www.example.net", "app.svc.other.test", 443, True), "backend_hostname",
     "internal zone"),
    (("www.example.net", "evilsvc.example.test", 443, True), "backend_hostname",
     "internal zone"),
    (("www.example.net", "*." + INTERNAL_ZONE, 443, True), "backend_hostname", "valid DNS"),
    (("www.example.net", BACKEND_HOST, 0, True), "backend_port", "1-65535"),
    (("www.example.net", BACKEND_HOST, 65536, True), "backend_port", "1-65535"),
    (("www.example.net", BACKEND_HOST, True, True), "backend_port", "1-65535"),
    (("www.example.net", BACKEND_HOST, "443", True), "backend_port", "1-65535"),
])
def test_validate_rejects(args: tuple[object, ...], field: str, text: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate(CFG, *args)
    assert err.value.field == field and text in str(err.value)


def test_internal_names_not_published() -> None:
    cfg = from_dict({"edge": {"allowed_domains": ["example.net"],
                              "internal_zone": "svc.example.net"}})
    with pytest.raises(ValidationError, match="inside the internal zone"):
        validate(cfg, "app.svc.example.net", "app.svc.example.net", 443)


def test_validation_happens_before_any_network(tmp_path: Path) -> None:
    """Nothing listens at the configured proxy, issuer or DNS: a bad request still gets
    the validation error, so no step ran."""
    dead = free_port()
    cfg = from_dict({"state": {"dir": str(tmp_path)},
                     "proxy": {"admin": f"http://127.0.0.1:{dead}"},
                     "acme": {"directory": f"https://127.0.0.1:{dead}/dir"},
                     "dns": {"nameservers": [f"127.0.0.1:{dead}"]},
                     "edge": {"internal_zone": INTERNAL_ZONE}})
    em = EdgeManager(cfg, Registry(tmp_path / "registry.db"))
    with pytest.raises(ValidationError, match="no cleartext"):
        em.setup("www.example.net", BACKEND_HOST, 443, backend_tls=False)
    with pytest.raises(NotFoundError):
        em.remove("www.example.net")
    assert em.list() == [] and em.health() == [] and em.reconcile() == []


# -- integration ------------------------------------------------------------------------

@dataclass
class Edge:
    em: EdgeManager
    cfg: AgentConfig
    caddy: Caddy
    pebble: Pebble
    backend: NetnsBackend
    root: Path

    @property
    def cert_dir(self) -> Path:
        return self.cfg.state_dir / "edge" / "certs"

    def get(self, host: str) -> tuple[int, str, object]:
        return https_get(self.caddy.https_port, host, self.root)

    def assert_nothing_for(self, host: str) -> None:
        assert self.em.registry.get_edge_route(host) is None
        left = [p.name for p in self.cert_dir.glob(f"{host}.*")] if self.cert_dir.exists() else []
        assert left == []
        if self.caddy.proc is not None and self.caddy.proc.alive():
            text = str(self.caddy.config())
            assert route_id(host) not in text and cert_id(host) not in text


def _edge(tmp_path: Path, caddy: Caddy, pebble: Pebble, dns: Dnsmasq,
          backend: NetnsBackend, **acme: object) -> Edge:
    cfg = make_edge_config(tmp_path / "state", caddy, pebble, dns, backend.ca_file, **acme)
    root = tmp_path / f"pebble-root-{pebble.port}.pem"
    root.write_bytes(pebble.root_pem())
    return Edge(EdgeManager(cfg, Registry(cfg.state_dir / "registry.db")), cfg, caddy, pebble,
                backend, root)


@pytest.fixture
def edge(tmp_path: Path, caddy: Caddy, pebble: Pebble, edge_dns: Dnsmasq,
         netns_backend: NetnsBackend) -> Iterator[Edge]:
    e = _edge(tmp_path, caddy, pebble, edge_dns, netns_backend)
    yield e
    e.em.close()
    e.em.registry.close()


def test_end_to_end_setup_serve_list_remove(edge: Edge) -> None:
    host, port = "www.example.net", edge.backend.port
    route = edge.em.setup(host, BACKEND_HOST, port)
    assert route["backend_address"] == "100.64.0.2" and route["backend_port"] == port
    assert set(edge.em.last_timings) >= {"dns", "certificate", "proxy", "total"}

    status, body, served = edge.get(host)
    # The backend sees its own name as Host, as in SNI (a node proxy routes by it).
    assert status == 200 and body.startswith(BACKEND_BODY) and f"host={BACKEND_HOST}" in body
    [listed] = edge.em.list()
    assert listed["cert_serial"] == format(served.serial_number, "x")
    assert listed["cert_expires"] == served.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    san = served.extensions.get_extension_for_class(
        __import__("cryptography.x509", fromlist=["x"]).SubjectAlternativeName).value
    assert [n.value for n in san] == [host]

    rec = edge.em.registry.get_edge_route(host)
    assert rec is not None
    assert stat.S_IMODE(Path(rec.key_path).stat().st_mode) == 0o600
    assert rec.cert_serial in Path(rec.cert_path).name

    # same arguments again: success, nothing changed anywhere
    config_before = edge.caddy.config()
    files_before = sorted(p.name for p in edge.cert_dir.iterdir())
    again = edge.em.setup(host, BACKEND_HOST, port)
    assert again == route
    assert edge.caddy.config() == config_before
    assert sorted(p.name for p in edge.cert_dir.iterdir()) == files_before

    edge.em.remove(host)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        edge.get(host)
    edge.assert_nothing_for(host)
    assert edge.em.list() == []
    with pytest.raises(NotFoundError):
        edge.em.remove(host)


def test_new_backend_updates_route_without_new_cert(edge: Edge) -> None:
    host, port = "api.example.net", edge.backend.port
    first = edge.em.setup(host, BACKEND_HOST, port)
    second = edge.em.setup(host, f"app2.{INTERNAL_ZONE}", port)
    assert second["cert_serial"] == first["cert_serial"]
    assert second["backend_hostname"] == f"app2.{INTERNAL_ZONE}"
    routes = edge.caddy.config()["apps"]["http"]["servers"][SERVER]["routes"]
    [ours] = [r for r in routes if r["@id"] == route_id(host)]
    assert ours["handle"][0]["transport"]["tls"]["server_name"] == f"app2.{INTERNAL_ZONE}"
    status, body, served = edge.get(host)
    assert status == 200 and body.startswith(BACKEND_BODY)
    assert format(served.serial_number, "x") == first["cert_serial"]
    edge.em.remove(host)


def test_failed_update_leaves_old_route_serving(edge: Edge) -> None:
    host, port = "keep.example.net", edge.backend.port
    first = edge.em.setup(host, BACKEND_HOST, port)
    with pytest.raises(DNSCheckError, match="dns step failed"):
        edge.em.setup(host, f"lan.{INTERNAL_ZONE}", port)
    assert edge.em.list() == [first]
    status, body, _ = edge.get(host)
    assert status == 200 and body.startswith(BACKEND_BODY)
    edge.em.remove(host)


@pytest.mark.parametrize(("backend", "exc", "text"), [
    (f"lan.{INTERNAL_ZONE}", DNSCheckError, "10.0.0.5"),
    (f"mixed.{INTERNAL_ZONE}", DNSCheckError, "resolves to 10.0.0.5,"),
    (f"nope.{INTERNAL_ZONE}", DNSCheckError, "NXDOMAIN"),
])
def test_rejected_backends_leave_nothing(edge: Edge, backend: str, exc: type[Exception],
                                         text: str) -> None:
    host = "bad.example.net"
    with pytest.raises(exc) as err:
        edge.em.setup(host, backend, edge.backend.port)
    assert "dns step failed" in str(err.value) and text in str(err.value)
    edge.assert_nothing_for(host)


@pytest.mark.parametrize(("host", "tls", "text"), [
    ("evilexample.net", True, "not under an allowed domain"),
    ("www.example.net", False, "no cleartext to backends"),
])
def test_rejected_requests_leave_nothing(edge: Edge, host: str, tls: bool, text: str) -> None:
    with pytest.raises(ValidationError, match=text):
        edge.em.setup(host, BACKEND_HOST, edge.backend.port, backend_tls=tls)
    edge.assert_nothing_for(host)


def test_issuer_stopped_leaves_nothing(tmp_path: Path, caddy: Caddy, edge_dns: Dnsmasq,
                                       netns_backend: NetnsBackend,
                                       pebble_factory: Callable[..., Pebble]) -> None:
    peb = pebble_factory()
    e = _edge(tmp_path, caddy, peb, edge_dns, netns_backend)
    peb.stop()
    with pytest.raises(IssuerError, match="certificate step failed.*unreachable"):
        e.em.setup("www.example.net", BACKEND_HOST, netns_backend.port)
    e.assert_nothing_for("www.example.net")
    assert [r for r in (caddy.config().get("apps") or {})] == []


def test_proxy_stopped_leaves_nothing_and_issues_nothing(edge: Edge) -> None:
    edge.caddy.stop()
    with pytest.raises(ProxyError, match="proxy step failed.*unreachable"):
        edge.em.setup("www.example.net", BACKEND_HOST, edge.backend.port)
    edge.assert_nothing_for("www.example.net")
    assert not edge.cert_dir.exists() or list(edge.cert_dir.iterdir()) == []
    assert edge.em.issuer.requests == 0  # failed before ordering a certificate


def test_restarted_caddy_gets_routes_back(edge: Edge) -> None:
    host = "back.example.net"
    edge.em.setup(host, BACKEND_HOST, edge.backend.port)
    edge.caddy.stop()
    edge.caddy.start()  # empty config, same ports
    with pytest.raises((ssl.SSLError, ConnectionError)):
        edge.get(host)
    # a restarted agent: new manager over the same registry
    em2 = EdgeManager(edge.cfg, edge.em.registry)
    assert em2.reconcile() == [f"re-registered edge route {host}"]
    status, body, _ = edge.get(host)
    assert status == 200 and body.startswith(BACKEND_BODY)
    assert em2.reconcile() == []
    em2.remove(host)


def test_short_lived_certificate_renewed_and_served(
        tmp_path: Path, caddy: Caddy, edge_dns: Dnsmasq, netns_backend: NetnsBackend,
        pebble_factory: Callable[..., Pebble]) -> None:
    peb = pebble_factory(validity_s=3600)  # one hour, renewal window one day: always due
    e = _edge(tmp_path, caddy, peb, edge_dns, netns_backend, renew_before_days=1)
    host = "short.example.net"
    first = e.em.setup(host, BACKEND_HOST, netns_backend.port)
    old = e.em.registry.get_edge_route(host)
    assert old is not None
    _, _, served = e.get(host)
    assert format(served.serial_number, "x") == first["cert_serial"]

    actions = e.em.reconcile()
    assert len(actions) == 1 and actions[0].startswith(f"renewed certificate for {host}")
    [now] = e.em.list()
    assert now["cert_serial"] != first["cert_serial"]
    status, body, served = e.get(host)
    assert status == 200 and body.startswith(BACKEND_BODY)
    assert format(served.serial_number, "x") == now["cert_serial"]
    assert now["cert_expires"] == served.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert not Path(old.cert_path).exists() and not Path(old.key_path).exists()
    e.em.remove(host)


def test_health_reasons(tmp_path: Path, caddy: Caddy, edge_dns: Dnsmasq,
                        netns_backend: NetnsBackend,
                        pebble_factory: Callable[..., Pebble]) -> None:
    peb = pebble_factory()
    e = _edge(tmp_path, caddy, peb, edge_dns, netns_backend)
    assert e.em.health() == []
    e.em.setup("h.example.net", BACKEND_HOST, netns_backend.port)
    assert e.em.health() == []
    caddy.stop()
    [reason] = e.em.health()
    assert reason.startswith("edge proxy unreachable")
    peb.stop()
    reasons = e.em.health()
    assert len(reasons) == 2 and reasons[1].startswith("certificate issuer unreachable")
    caddy.start()
    assert e.em.reconcile() == ["re-registered edge route h.example.net"]
    assert len(e.em.health()) == 1


def test_remove_with_proxy_down_changes_nothing(edge: Edge) -> None:
    host = "stay.example.net"
    edge.em.setup(host, BACKEND_HOST, edge.backend.port)
    rec = edge.em.registry.get_edge_route(host)
    assert rec is not None
    edge.caddy.stop()
    with pytest.raises(ProxyError, match="proxy step failed"):
        edge.em.remove(host)
    assert edge.em.registry.get_edge_route(host) == rec
    assert Path(rec.cert_path).exists() and Path(rec.key_path).exists()
    edge.caddy.start()
    assert edge.em.reconcile() == [f"re-registered edge route {host}"]
    edge.em.remove(host)
    edge.assert_nothing_for(host)


def test_reconcile_removes_orphaned_cert_files(edge: Edge) -> None:
    host = "orphan.example.net"
    edge.em.setup(host, BACKEND_HOST, edge.backend.port)
    stray = edge.cert_dir / "gone.example.net.abc.crt"
    stray.write_text("left by a crash before the row was written")
    assert edge.em.reconcile() == ["removed orphaned certificate file gone.example.net.abc.crt"]
    assert not stray.exists()
    rec = edge.em.registry.get_edge_route(host)
    assert rec is not None and Path(rec.cert_path).exists()
    edge.em.remove(host)


def test_concurrent_setups_all_land(edge: Edge) -> None:
    """The HTTP server is threaded: parallel setups must not lose each other's routes."""
    import threading

    hosts = [f"par{i}.example.net" for i in range(4)]
    errors: list[BaseException] = []

    def run(h: str) -> None:
        try:
            edge.em.setup(h, BACKEND_HOST, edge.backend.port)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(r["hostname"] for r in edge.em.list()) == hosts
    assert sorted(edge.em.router.list_routes()) == hosts
    for h in hosts:
        status, body, _ = edge.get(h)
        assert status == 200 and body.startswith(BACKEND_BODY)
        edge.em.remove(h)


def test_relative_state_dir_gives_caddy_absolute_cert_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caddy resolves a relative path against its own cwd, not the agent's."""
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"state": {"dir": "st"}, "edge": {"backend_ca": "ca.pem"}})
    em = EdgeManager(cfg, Registry(tmp_path / "registry.db"))
    assert em.router.cert_path("www.example.net", "1f") == \
        tmp_path / "st" / "edge" / "certs" / "www.example.net.1f.crt"
    assert em.router.key_path("www.example.net", "1f").is_absolute()
    assert em.router.backend_ca == str(tmp_path / "ca.pem")
    em.registry.close()


def test_unreadable_ca_bundle_is_a_health_reason_not_a_crash(tmp_path: Path) -> None:
    """A missing acme.ca_bundle must degrade health with a reason (and fail issuance with
    an issuer error), not raise an OSError out of the health check."""
    from mcp_node.records import EdgeRouteRecord

    dead = free_port()
    cfg = from_dict({"state": {"dir": str(tmp_path)},
                     "proxy": {"admin": f"http://127.0.0.1:{dead}"},
                     "acme": {"directory": f"https://127.0.0.1:{dead}/dir",
                              "ca_bundle": str(tmp_path / "missing-ca.pem")},
                     "edge": {"internal_zone": INTERNAL_ZONE}})
    em = EdgeManager(cfg, Registry(tmp_path / "registry.db"))
    em.registry.put_edge_route(EdgeRouteRecord(
        hostname="www.example.net", backend_hostname=BACKEND_HOST, backend_port=443,
        backend_address="100.64.0.2", cert_path=str(tmp_path / "c"),
        key_path=str(tmp_path / "k")))
    reasons = em.health()
    assert any(r.startswith("certificate issuer unreachable") and "missing-ca.pem" in r
               for r in reasons), reasons
    with pytest.raises(IssuerError, match="missing-ca.pem"):
        em._issue("www.example.net")
    assert not (tmp_path / "edge" / "certs").exists() or \
        list((tmp_path / "edge" / "certs").iterdir()) == []
    em.registry.close()
