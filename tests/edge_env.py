"""Fixtures for edge tests: real Caddy, Pebble, dnsmasq and a TLS backend in a netns.

Every process is started by argv, recorded by pid and stopped by that pid;
every wait has a deadline; every port is picked free. The backend lives in a
network namespace made here (100.64.0.1/30 host side, 100.64.0.2/30 inside)
and deleted afterwards: the only Tailnet address any test talks to.

Run as a script (``python tests/edge_env.py serve ...``) it is the backend
HTTPS server started inside the namespace.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ != "__main__":
    import pytest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from netns import VethNetns

TOP = Path(__file__).resolve().parent.parent
PUBLIC_DOMAIN = "example.net"
INTERNAL_ZONE = "svc.example.test"
BACKEND_HOST = f"app.{INTERNAL_ZONE}"
BACKEND_BODY = "hello from the tailnet backend"
NS_HOST_ADDR, NS_ADDR = "100.64.0.1", "100.64.0.2"
# Names dnsmasq answers; none of the non-Tailnet ones is ever connected to.
DNS_RECORDS = [
    (BACKEND_HOST, NS_ADDR),
    (f"app2.{INTERNAL_ZONE}", NS_ADDR),
    (f"lan.{INTERNAL_ZONE}", "10.0.0.5"),
    (f"mixed.{INTERNAL_ZONE}", NS_ADDR),
    (f"mixed.{INTERNAL_ZONE}", "10.0.0.5"),
    (f"v6.{INTERNAL_ZONE}", "fd7a:115c:a1e0::2"),
    (f"mapped.{INTERNAL_ZONE}", "::ffff:100.64.0.2"),
]


# -- generic helpers -------------------------------------------------------------

def free_port(udp_too: bool = False) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    """A child process stopped by its own pid (never by name)."""

    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.popen = None

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


# -- certificates ------------------------------------------------------------------

@dataclass
class TestCA:
    """A throwaway CA made with cryptography (backend certs, Pebble's own HTTPS)."""

    __test__ = False

    name: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()))
    cert: x509.Certificate | None = None

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5))
                     .not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        assert self.cert is not None
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, names: list[str], ips: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        assert self.cert is not None
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- dnsmasq -------------------------------------------------------------------------

def dnsmasq_argv(port: int, records: list[tuple[str, str]], public_addr: str = "127.0.0.1",
                 zones: tuple[str, ...] = (INTERNAL_ZONE, PUBLIC_DOMAIN)) -> list[str]:
    argv = ["dnsmasq", "--no-daemon", "--port", str(port), "--listen-address", "127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", "--log-queries"]
    argv += [f"--local=/{z}/" for z in zones]
    # Public names point at loopback so Pebble's HTTP-01 validation reaches our responder.
    argv.append(f"--address=/{PUBLIC_DOMAIN}/{public_addr}")
    argv += [f"--host-record={name},{addr}" for name, addr in records]
    return argv


@dataclass
class Dnsmasq:
    workdir: Path
    records: list[tuple[str, str]] = field(default_factory=lambda: list(DNS_RECORDS))
    port: int = 0
    proc: Proc | None = None

    def start(self) -> Dnsmasq:
        import dns.resolver

        self.port = free_port(udp_too=True)
        self.proc = Proc(dnsmasq_argv(self.port, self.records), self.workdir / "dnsmasq.log")
        self.proc.start()
        res = dns.resolver.Resolver(configure=False)
        res.nameservers, res.port, res.lifetime = ["127.0.0.1"], self.port, 1.0

        def up() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"dnsmasq died: {self.proc.tail()}")
            res.resolve(BACKEND_HOST, "A")
            return True

        wait_until(up, "dnsmasq")
        return self

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


# -- Pebble ------------------------------------------------------------------------

EAB_KID = "kid-1"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


@dataclass
class Pebble:
    workdir: Path
    dns_port: int
    http01_port: int = 0
    always_valid: bool = False
    eab: bool = False
    validity_s: int = 0
    port: int = 0
    mgmt_port: int = 0
    proc: Proc | None = None
    ca_bundle: Path = Path()

    def start(self) -> Pebble:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, self.mgmt_port = free_port(), free_port()
            self.http01_port = self.http01_port or free_port()
            ca = TestCA("pebble-https-test-ca")
            cert, key = ca.leaf(["localhost"], ("127.0.0.1",))
            (self.workdir / "https.crt").write_bytes(cert)
            (self.workdir / "https.key").write_bytes(key)
            self.ca_bundle = self.workdir / "https-ca.pem"
            self.ca_bundle.write_bytes(ca.pem)
        conf: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.workdir / "https.crt"),
            "privateKey": str(self.workdir / "https.key"),
            "httpPort": self.http01_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab,
        }
        if self.eab:
            conf["externalAccountMACKeys"] = {EAB_KID: EAB_KEY}
        if self.validity_s:
            conf["certificateValidityPeriod"] = self.validity_s
        cfg = self.workdir / "pebble.json"
        cfg.write_text(json.dumps({"pebble": conf}))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PEBBLE_VA_NOSLEEP": "1"}
        if self.always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        self.proc = Proc(["pebble", "-config", str(cfg), "-dnsserver",
                          f"127.0.0.1:{self.dns_port}"], self.workdir / "pebble.log", env=env)
        self.proc.start()

        def up() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"pebble died: {self.proc.tail()}")
            self.get(self.directory_url)
            return True

        wait_until(up, "pebble", timeout=60.0)   # it makes its keys first: slow on a loaded node
        return self

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            return bytes(resp.read())

    def root_pem(self) -> bytes:
        """The root that signs issued certificates (regenerated at every start)."""
        return self.get(f"https://127.0.0.1:{self.mgmt_port}/roots/0")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


# -- Caddy -------------------------------------------------------------------------

@dataclass
class Caddy:
    workdir: Path
    admin_port: int = 0
    https_port: int = 0
    proc: Proc | None = None

    def start(self) -> Caddy:
        """(Re)start with an empty config: only the admin endpoint, nothing persisted."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.admin_port:
            self.admin_port, self.https_port = free_port(), free_port()
        cfg = self.workdir / "caddy.json"
        cfg.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{self.admin_port}",
                                             "config": {"persist": False}}}))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": str(self.workdir), "XDG_CONFIG_HOME": str(self.workdir / "cfg"),
               "XDG_DATA_HOME": str(self.workdir / "data")}
        self.proc = Proc(["caddy", "run", "--config", str(cfg)], self.workdir / "caddy.log",
                         env=env)
        self.proc.start()

        def up() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"caddy died: {self.proc.tail()}")
            urllib.request.urlopen(f"{self.admin_url}/config/", timeout=2).read()
            return True

        wait_until(up, "caddy admin API")
        return self

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def config(self) -> Any:
        with urllib.request.urlopen(f"{self.admin_url}/config/", timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def https_get(port: int, sni: str, cafile: Path,
              path: str = "/") -> tuple[int, str, x509.Certificate]:
    """GET through Caddy on loopback with the public name as SNI and Host."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        conn = http.client.HTTPConnection(sni, port, timeout=10)
        conn.sock = tls
        conn.request("GET", path, headers={"Host": sni})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return resp.status, body, x509.load_der_x509_certificate(der)


# -- the Tailnet backend in a netns ---------------------------------------------------

@dataclass
class NetnsBackend:
    """HTTPS server at 100.64.0.2 inside a namespace this fixture made (and deletes)."""

    workdir: Path
    ca: TestCA
    name: str = field(default_factory=lambda: "mcpedge" + secrets.token_hex(4))
    port: int = 0
    proc: Proc | None = None
    ns: VethNetns | None = None

    def start(self) -> NetnsBackend:
        self.ns = VethNetns(self.name, f"mce{self.name[-6:]}h", NS_HOST_ADDR, NS_ADDR).start()
        cert, key = self.ca.leaf([BACKEND_HOST, f"app2.{INTERNAL_ZONE}"])
        (self.workdir / "backend.crt").write_bytes(cert)
        (self.workdir / "backend.key").write_bytes(key)
        self.port = 20000 + secrets.randbelow(20000)  # inside our own namespace: always free
        self.proc = Proc(["ip", "netns", "exec", self.name, sys.executable, __file__, "serve",
                          str(self.port), str(self.workdir / "backend.crt"),
                          str(self.workdir / "backend.key"), BACKEND_BODY],
                         self.workdir / "backend.log")
        self.proc.start()
        ctx = ssl.create_default_context(cafile=str(self.ca_file))

        def up() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"backend died: {self.proc.tail()}")
            with socket.create_connection((NS_ADDR, self.port), timeout=2) as raw, \
                    ctx.wrap_socket(raw, server_hostname=BACKEND_HOST):
                return True

        wait_until(up, "netns backend")
        return self

    @property
    def ca_file(self) -> Path:
        path = self.workdir / "backend-ca.pem"
        if not path.exists():
            path.write_bytes(self.ca.pem)
        return path

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
        if self.ns is not None:
            self.ns.stop()
            self.ns = None


def serve_backend(port: int, cert: str, key: str, body: str) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = f"{body} path={self.path} host={self.headers.get('Host')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        serve_backend(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    sys.exit(2)


# -- fixtures ------------------------------------------------------------------------

else:
    from mcp_node.config import AgentConfig, from_dict

    def _need(*tools: str, also: tuple[str, ...] = ()) -> None:
        """conftest.need, imported late: benches import this module outside pytest."""
        from conftest import need

        need(*tools, also=also)

    @pytest.fixture(scope="session")
    def edge_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
        _need("dnsmasq")
        d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq")).start()
        yield d
        d.stop()

    @pytest.fixture(scope="session")
    def pebble(tmp_path_factory: pytest.TempPathFactory, edge_dns: Dnsmasq) -> Iterator[Pebble]:
        """Shared Pebble doing real HTTP-01 validation (through dnsmasq to our responder)."""
        _need("pebble")
        p = Pebble(tmp_path_factory.mktemp("pebble"), edge_dns.port).start()
        yield p
        p.stop()

    @pytest.fixture
    def pebble_factory(tmp_path: Path, edge_dns: Dnsmasq) -> Iterator[Callable[..., Pebble]]:
        _need("pebble")
        started: list[Pebble] = []

        def make(**kw: Any) -> Pebble:
            p = Pebble(tmp_path / f"pebble{len(started)}", edge_dns.port, **kw).start()
            started.append(p)
            return p

        yield make
        for p in started:
            p.stop()

    @pytest.fixture
    def caddy(tmp_path: Path) -> Iterator[Caddy]:
        _need("caddy")
        c = Caddy(tmp_path / "caddy").start()
        yield c
        c.stop()

    @pytest.fixture(scope="session")
    def backend_ca() -> TestCA:
        return TestCA("mcp-edge-backend-test-ca")

    @pytest.fixture(scope="session")
    def netns_backend(tmp_path_factory: pytest.TempPathFactory,
                      backend_ca: TestCA) -> Iterator[NetnsBackend]:
        _need("ip")
        if os.geteuid() != 0:
            _need(also=("root (for network namespaces)",))
        b = NetnsBackend(tmp_path_factory.mktemp("backend"), backend_ca)
        try:
            b.start()
        except BaseException:
            b.stop()
            raise
        yield b
        b.stop()

    @pytest.fixture
    def netns_owners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """Owner records of namespaces made by the test itself (not the session's)."""
        _need("ip")
        if os.geteuid() != 0:
            _need(also=("root (for network namespaces)",))
        import netns

        monkeypatch.setattr(netns, "OWNERS", tmp_path / "owners")
        return netns.OWNERS

    def make_edge_config(state_dir: Path, caddy: Caddy, pebble: Pebble, dns: Dnsmasq,
                         backend_ca: Path | None = None, **acme: Any) -> AgentConfig:
        acme_cfg = {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle),
                    "http01_port": pebble.http01_port, **acme}
        return from_dict({
            "state": {"dir": str(state_dir)},
            "proxy": {"admin": caddy.admin_url, "https_port": caddy.https_port},
            "acme": acme_cfg,
            "dns": {"nameservers": [dns.nameserver], "timeout_s": 2.0},
            "edge": {"allowed_domains": [PUBLIC_DOMAIN], "internal_zone": INTERNAL_ZONE,
                     "backend_ca": str(backend_ca or "")},
        })
