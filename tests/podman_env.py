"""Podman fixtures, shared by every area's tests (imported by conftest).

- ``hello_image`` / ``hello_image_v2``: ``"localhost/mcp-hello:v1"`` / ``":v2"``, built once
  per session by ``scripts/build_test_image.sh`` (skips without podman and gcc).
- ``podman_socket``: session-wide ``podman system service`` started by the fixture and
  stopped by pid at the end; yields its ``unix://...`` URL for ``config.podman.socket``.
  Like every podman CLI call here, it runs with ``egress.no_egress_env`` (no way out).
- ``podman_cleanup``: a ``PodmanCleanup``; ``.add(owner)`` registers an ``mcp.owner``
  label whose containers are force-removed at teardown (only those).
- ``podman_owner``: a unique owner label for this test (already registered for cleanup).
- ``podman_config``: an ``AgentConfig`` with the session socket, CONTAINERS_CONF and a
  per-test state dir.
- ``podman_runtime``: a ``PodmanRuntime(podman_config, state_dir, podman_owner)``.

Breakage makers (real podman, a race run until it happens; each returns its seed):
``make_storage_only(name, image)`` (a container only storage knows holds the name),
``make_storage_gone(name, image, labels)`` (a ``Created`` container without storage);
``external_states(name)`` lists the states ``podman ps --external`` shows for a name.

Helpers: ``free_port()`` (a free 127.0.0.1 port), ``wait_http(port, path)`` (GET with a
deadline, returns the body), ``podman_cli(*args)`` (runs the podman CLI with our
CONTAINERS_CONF, returns CompletedProcess).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from egress import no_egress, no_egress_env

from mcp_node.config import AgentConfig, from_dict
from mcp_node.podman import PodmanRuntime, PodmanService
from mcp_node.runtime import LABEL_OWNER

__all__ = [
    "PodmanCleanup", "free_port", "wait_http", "podman_cli", "containers_conf",
    "hello_images", "hello_image", "hello_image_v2", "podman_socket", "podman_cleanup",
    "podman_owner", "podman_config", "podman_runtime", "podman_binary",
    "external_states", "make_storage_only", "make_storage_gone",
]

RACE_ROUNDS = 400   # each race happened within ~10 rounds when measured

_TOP = Path(__file__).resolve().parent.parent


def containers_conf() -> str:
    return os.environ.get("CONTAINERS_CONF") or str(_TOP / "scripts" / "containers.conf")


def _env() -> dict[str, str]:
    """The podman CLI's: our CONTAINERS_CONF and no way out (tests/egress.py)."""
    return no_egress_env({**os.environ, "CONTAINERS_CONF": containers_conf()})


def podman_cli(*args: str, check: bool = False,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True,
                          check=check, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/", timeout: float = 30.0, host: str = "127.0.0.1") -> str:
    """GET until it answers 200 or the deadline passes (then the last error is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
                return str(resp.read().decode())
        except (OSError, urllib.error.URLError, http.client.HTTPException):
            # HTTPException: a guest still booting can drop a half-read response.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def external_states(name: str) -> list[str]:
    """States of the containers named exactly ``name``, storage-only ones included."""
    out = podman_cli("ps", "-a", "--external", "--format", "json", "--filter",
                     f"name=^{name}$", check=True).stdout
    return sorted(str(e["State"]).lower() for e in json.loads(out or "[]")
                  if name in (e.get("Names") or []))


def make_storage_only(name: str, image: str) -> int:
    """SIGKILL ``podman create`` at random points (a create takes ~60 ms here) until
    it dies after storage made the container and before libpod recorded it."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(RACE_ROUNDS):
        proc = subprocess.Popen(["podman", "create", "--name", name, image], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.02, 0.07))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if external_states(name) == ["storage"]:
            return seed
        podman_cli("rm", "-f", name)
    raise AssertionError(f"no storage-only container after {RACE_ROUNDS} rounds (seed {seed})")


def make_storage_gone(name: str, image: str, labels: dict[str, str]) -> int:
    """Race ``podman rm -f`` against ``podman create`` until the create recorded a
    container whose storage the rm had already removed (inspect then fails)."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    argv = ["podman", "create", "--name", name,
            *[f"--label={k}={v}" for k, v in labels.items()], image]
    for _ in range(RACE_ROUNDS):
        proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.06))
        podman_cli("rm", "-f", name)
        proc.wait(timeout=30)
        if external_states(name) == ["created"] and \
                podman_cli("inspect", name).returncode != 0:
            return seed
        podman_cli("rm", "-f", "-t", "0", name)
    raise AssertionError(f"no storage-less container after {RACE_ROUNDS} rounds (seed {seed})")


class PodmanCleanup:
    """Removes, at teardown, exactly the containers labelled with the owners added."""

    def __init__(self) -> None:
        self.owners: list[str] = []

    def add(self, owner: str) -> str:
        self.owners.append(owner)
        return owner

    def ids(self, owner: str) -> list[str]:
        out = podman_cli("ps", "-aq", "--filter", f"label={LABEL_OWNER}={owner}").stdout
        return out.split()

    def run(self) -> None:
        for owner in self.owners:
            ids = self.ids(owner)
            if ids:
                podman_cli("rm", "-f", "-t", "2", *ids)


@pytest.fixture
def podman_binary() -> None:
    """For tests that start podman themselves (no shared socket)."""
    from conftest import need
    need("podman")


@pytest.fixture(scope="session")
def hello_images() -> dict[str, str]:
    from conftest import need
    need("podman", "gcc")
    refs = {}
    for tag in ("v1", "v2"):
        proc = subprocess.run([str(_TOP / "scripts" / "build_test_image.sh"), tag], env=_env(),
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"build_test_image.sh {tag} failed: {proc.stderr[-2000:]}")
        refs[tag] = proc.stdout.strip().splitlines()[-1]
    return refs


@pytest.fixture
def hello_image(hello_images: dict[str, str]) -> str:
    return hello_images["v1"]


@pytest.fixture
def hello_image_v2(hello_images: dict[str, str]) -> str:
    return hello_images["v2"]


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from conftest import need
    need("podman")
    service = PodmanService(tmp_path_factory.mktemp("podman-svc"), containers_conf())
    with pytest.MonkeyPatch.context() as mp:
        no_egress(mp)   # the service takes this process's environment when it starts
        service.ensure()
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture
def podman_cleanup() -> Iterator[PodmanCleanup]:
    cleanup = PodmanCleanup()
    try:
        yield cleanup
    finally:
        cleanup.run()


@pytest.fixture
def podman_owner(podman_cleanup: PodmanCleanup) -> str:
    return podman_cleanup.add(f"test-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def podman_config(podman_socket: str, tmp_path: Path) -> AgentConfig:
    # A test's volumes live in its tmp_path: that is their volume root.
    return from_dict({
        "podman": {"socket": podman_socket, "containers_conf": containers_conf(),
                   "volume_roots": [str(tmp_path)]},
        "state": {"dir": str(tmp_path / "state")},
    })


@pytest.fixture
def podman_runtime(podman_config: AgentConfig, podman_owner: str) -> Iterator[PodmanRuntime]:
    runtime = PodmanRuntime(podman_config, podman_config.state_dir, podman_owner)
    try:
        yield runtime
    finally:
        runtime.close()
