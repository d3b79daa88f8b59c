"""A private image registry for tests (issue 20): Debian's ``docker-registry``
(distribution 2.8) on 127.0.0.1, TLS from a CA the test makes, htpasswd users.

- ``Registry(directory)``: ``start()`` makes the CA (``edge_env.TestCA``), a server
  certificate for ``IP:127.0.0.1``, an htpasswd file (bcrypt, from the ``bcrypt``
  test extra) with ``USER``/``password``, starts the registry on a free port and waits
  (bounded) until it answers; ``stop()`` stops it by pid. ``host`` is ``127.0.0.1:PORT``,
  ``ca_file`` the CA's PEM, ``cert_dir`` a ``podman --cert-dir`` for it,
  ``auth_file`` a containers-auth.json holding the user (for the test's own pushes: a
  test may put credentials on its own command lines, the agent never does).
  ``push(local, repo_tag)`` pushes a local image as ``host/repo_tag`` and returns that.
- ``private_registry``: the session's one ``Registry``, with ``localhost/mcp-hello:v1``
  pushed as ``mcp/hello:v1`` (skips through ``need`` without docker-registry or bcrypt);
  at the end, the names its pulls left on the node (``host/...``, names only) are removed.

Every podman call here runs with ``egress.no_egress_env``: the registry on 127.0.0.1 is
reached directly (NO_PROXY), anything else fails at the closed-port proxy.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_env import Proc, TestCA

__all__ = ["Registry", "private_registry", "USER"]

USER = "alice"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """One ``docker-registry serve`` process of the test's own (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.password = "pw-" + secrets.token_hex(12)
        self.ca = TestCA("mcp test registry CA")
        self.ca_file = directory / "ca.pem"
        self.cert_dir = directory / "certs"
        self.auth_file = directory / "auth.json"
        self.proc: Proc | None = None

    def _write(self) -> Path:
        import bcrypt

        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file.write_bytes(self.ca.pem)
        (self.cert_dir / self.host).mkdir(parents=True, exist_ok=True)
        (self.cert_dir / self.host / "ca.crt").write_bytes(self.ca.pem)
        cert, key = self.ca.leaf(["localhost"], ips=("127.0.0.1",))
        (self.dir / "server.pem").write_bytes(cert)
        (self.dir / "server.key").write_bytes(key)
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=5)).decode()
        (self.dir / "htpasswd").write_text(f"{USER}:{hashed}\n")
        token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        self.auth_file.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        self.auth_file.chmod(0o600)
        conf = self.dir / "config.yml"
        conf.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.dir / "data"}
http:
  addr: {self.host}
  tls:
    certificate: {self.dir / "server.pem"}
    key: {self.dir / "server.key"}
auth:
  htpasswd:
    realm: mcp-test
    path: {self.dir / "htpasswd"}
""")
        return conf

    def start(self, timeout: float = 30.0) -> Registry:
        conf = self._write()
        self.proc = Proc(["docker-registry", "serve", str(conf)], self.dir / "registry.log")
        self.proc.start()
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.alive(), self.proc.tail()
            try:
                opener.open(f"https://{self.host}/v2/", timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:   # up, and asking for a login
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"registry not up: {self.proc.tail()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def push(self, local: str, repo_tag: str) -> str:
        from podman_env import podman_cli

        ref = f"{self.host}/{repo_tag}"
        proc = podman_cli("push", "--cert-dir", str(self.cert_dir / self.host),
                          "--authfile", str(self.auth_file), local, ref, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return ref


@pytest.fixture(scope="session")
def private_registry(tmp_path_factory: pytest.TempPathFactory,
                     hello_images: dict[str, str]) -> Iterator[Registry]:
    from conftest import need, need_module

    need("docker-registry", "podman")
    need_module("bcrypt")
    from podman_env import podman_cli

    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        reg.push(hello_images["v1"], "mcp/hello:v1")
        yield reg
    finally:
        reg.stop()
        # the names this registry's pulls left (each only a name of the test image)
        out = podman_cli("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        names = [n for n in out.split() if n.startswith(f"{reg.host}/")]
        if names:
            podman_cli("rmi", *names)
