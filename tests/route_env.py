"""Fixtures for node-route tests: BIND9 with dynamic updates, a netns client, an agent
config serving routes on a Tailnet address (issue 11).

Reuses edge_env's Caddy, Pebble, Proc, free ports and waits. The node's
advertised address is the host side (100.64.1.1) of a veth pair into a
network namespace made here and deleted afterwards; the test's client runs
inside that namespace (100.64.1.2), resolves names through BIND listening on
100.64.1.1, and connects to the node proxy there. Pebble validates HTTP-01
through BIND too, so issuance depends on the DNS registration for real.

Run as a script (``python tests/route_env.py fetch ...``) it is that client.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ZONE", "TSIG_NAME", "HOST_ADDR", "NS_ADDR", "RouteNetns", "Bind",
           "make_route_config", "route_netns", "bind_dns", "route_pebble", "tls_get"]


def tls_get(port: int, host: str, tls: ssl.SSLContext) -> str:
    """GET / through the node proxy (TLS to the node's address, the route's name): the
    whole answer, status line first, or ``failed: ...`` saying why there was none."""
    try:
        with socket.create_connection((HOST_ADDR, port), timeout=5) as raw, \
                tls.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data.decode(errors="replace") or "failed: empty answer"
    except OSError as exc:
        return f"failed: {exc}"

ZONE = "svc.example.test"
TSIG_NAME = "mcp-test-key"
HOST_ADDR, NS_ADDR = "100.64.1.1", "100.64.1.2"


def fetch(ns_port: int, name: str, port: int, cafile: str, mode: str) -> str:
    """In the namespace: resolve ``name`` through BIND, then GET / over TLS (l7) or plain
    TCP (l4); prints the status line and body."""
    import dns.resolver

    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = [HOST_ADDR], ns_port, 5.0
    addr = res.resolve(name, "A")[0].to_text()
    raw = socket.create_connection((addr, port), timeout=10)
    sock: socket.socket = raw
    serial = ""
    if mode == "l7":
        from cryptography import x509

        tls = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=name)
        der = tls.getpeercert(binary_form=True)
        serial = format(x509.load_der_x509_certificate(der or b"").serial_number, "x")
        sock = tls
    with sock:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return f"{addr} {serial} " + data.decode(errors="replace")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "fetch":
        print(fetch(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]))
        sys.exit(0)
    sys.exit(2)

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import pytest  # noqa: E402
from edge_env import Caddy, Pebble, Proc, free_port, wait_until  # noqa: E402
from netns import VethNetns  # noqa: E402

from mcp_node.config import AgentConfig, from_dict  # noqa: E402


@dataclass
class RouteNetns:
    """A namespace with 100.64.1.2 inside and 100.64.1.1 (the node's address) outside."""

    name: str = field(default_factory=lambda: "mcproute" + secrets.token_hex(3))
    ns: VethNetns | None = None

    def start(self) -> RouteNetns:
        self.ns = VethNetns(self.name, f"mcr{self.name[-6:]}h", HOST_ADDR, NS_ADDR).start()
        return self

    def fetch(self, bind_port: int, name: str, port: int, cafile: Path,
              mode: str = "l7") -> str:
        """The client inside the namespace; raises with its output when it fails."""
        res = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, __file__,
                              "fetch", str(bind_port), name, str(port), str(cafile), mode],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"fetch {name}:{port} ({mode}) failed: {res.stderr[-1500:]}")
        return res.stdout

    def stop(self) -> None:
        if self.ns is not None:
            self.ns.stop()
            self.ns = None


@dataclass
class Bind:
    """named serving ZONE with ``allow-update`` for one TSIG key."""

    workdir: Path
    listen: tuple[str, ...] = ("127.0.0.1",)
    port: int = 0
    secret: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())
    proc: Proc | None = None

    def start(self) -> Bind:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(udp_too=True)
        wd = self.workdir
        zone = wd / "zone.db"
        if not zone.exists():
            zone.write_text(f"$TTL 60\n@ IN SOA ns.{ZONE}. admin.{ZONE}. 1 60 60 600 60\n"
                            f"@ IN NS ns.{ZONE}.\nns IN A 127.0.0.1\n")
        (wd / "named.conf").write_text(
            f'options {{ directory "{wd}"; listen-on port {self.port} '
            f'{{ {"; ".join(self.listen)}; }}; listen-on-v6 {{ none; }}; '
            f'pid-file "{wd}/named.pid"; recursion no; dnssec-validation no; '
            f'session-keyfile "{wd}/session.key"; }};\n'
            f'key "{TSIG_NAME}" {{ algorithm hmac-sha256; secret "{self.secret}"; }};\n'
            "controls { };\n"
            f'zone "{ZONE}" {{ type primary; file "{zone}"; '
            f'allow-update {{ key "{TSIG_NAME}"; }}; }};\n')
        self.proc = Proc(["named", "-g", "-u", "root", "-c", str(wd / "named.conf")],
                         wd / "named.log").start()

        def up() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"named died: {self.proc.tail()}")
            return bool(self.query(f"ns.{ZONE}", "A"))

        wait_until(up, "named")
        return self

    def query(self, name: str, rdtype: str) -> list[str]:
        q = dns.message.make_query(name, rdtype)
        resp = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=3)
        return [r.to_text() for rrset in resp.answer for r in rrset]

    def secret_file(self, path: Path, secret: str | None = None) -> Path:
        path.write_text((secret or self.secret) + "\n")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def make_route_config(base: AgentConfig, caddy: Caddy, pebble: Pebble, bind: Bind,
                      secret_file: Path, qemu: dict[str, Any] | None = None,
                      **proxy: Any) -> AgentConfig:
    """``qemu``: a ``[qemu]`` table too (a test of VM components)."""
    return from_dict({**({"qemu": qemu} if qemu else {}),
        "state": {"dir": str(base.state_dir)},
        "podman": {"socket": base.podman.socket, "containers_conf": base.podman.containers_conf},
        "node": {"advertise": HOST_ADDR},
        "proxy": {"admin": caddy.admin_url, "https_port": caddy.https_port,
                  "serve_routes": True, **proxy},
        "acme": {"directory": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle),
                 "http01_port": pebble.http01_port},
        "dns": {"update_server": f"127.0.0.1:{bind.port}", "tsig_name": TSIG_NAME,
                "tsig_secret_file": str(secret_file), "timeout_s": 2.0},
        "edge": {"internal_zone": ZONE},
    })


def _need(*tools: str, also: tuple[str, ...] = ()) -> None:
    from conftest import need

    need(*tools, also=also)


@pytest.fixture
def route_netns() -> Iterator[RouteNetns]:
    _need("ip", "named", "haproxy", "caddy", "pebble")
    if os.geteuid() != 0:
        _need(also=("root (for network namespaces)",))
    n = RouteNetns()
    try:
        n.start()
        yield n
    finally:
        n.stop()


@pytest.fixture
def bind_dns(tmp_path: Path, route_netns: RouteNetns) -> Iterator[Bind]:
    b = Bind(tmp_path / "bind", listen=("127.0.0.1", HOST_ADDR)).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def route_pebble(tmp_path: Path, bind_dns: Bind) -> Iterator[Pebble]:
    """Pebble doing real HTTP-01, resolving names through BIND."""
    p = Pebble(tmp_path / "pebble", bind_dns.port).start()
    try:
        yield p
    finally:
        p.stop()
