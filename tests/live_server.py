"""The HTTP server over an ``Agent`` with in-memory runtimes (``fake_runtime``): the wire
protocol, caps and deadlines tested without podman, so they run under ``--unit``.

``fake_live(tmp_path, **server_keys)`` serves on a free loopback port with the given
``[server]`` keys and yields a ``LiveServer`` (the same helpers as the podman-backed
fixture); the server and agent are shut down on exit.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fake_runtime import FakeWorld
from server_env import LiveServer

from mcp_node.agent import Agent
from mcp_node.config import from_dict as config_from_dict
from mcp_node.server import serve
from mcp_node.servicedef import from_dict as service_from_dict


@contextlib.contextmanager
def fake_live(tmp_path: Path, world: FakeWorld | None = None,
              **server: Any) -> Iterator[LiveServer]:
    world = world or FakeWorld()
    cfg = config_from_dict({"state": {"dir": str(tmp_path / "state")},
                            "server": {"listen": "127.0.0.1:0", **server}})
    agent = Agent(cfg, runtimes=world.runtimes())
    srv = serve(agent, cfg)
    try:
        assert srv.token_file is not None
        yield LiveServer(agent, srv, srv.url, srv.token_file.read_text().strip())
    finally:
        srv.shutdown()
        agent.close()


def deploy(live: LiveServer, name: str = "web") -> None:
    live.agent.deploy(service_from_dict(
        {"name": name, "components": [{"name": "main", "image": "img:v1"}]}))


def wait_until(pred: Callable[[], object], what: str, deadline_s: float = 20) -> None:
    """Poll ``pred`` until true; fail naming ``what`` after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while not pred():
        assert time.monotonic() < deadline, f"not within {deadline_s}s: {what}"
        time.sleep(0.02)


def connect(live: LiveServer, source: str = "127.0.0.1", timeout: float = 20) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(live.address)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (the socket's own timeout bounds the wait)."""
    out = b""
    while True:
        data = s.recv(65536)
        if not data:
            return out
        out += data


def auth_get(live: LiveServer, path: str, role: str = "operator",
             extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live.token(role)}\r\n"
            .encode() + extra + b"\r\n")


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (mode 0600): (cert path, key path)."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-agent test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return str(cert_path), str(key_path)
