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
