"""HTTP agent fixtures (imported by conftest).

- ``live_server``: a real ``Agent`` (session podman socket, per-test state dir) served by
  ``server.serve`` on a free loopback port, with ``server.max_body`` = ``SMALL_BODY``;
  yields a ``LiveServer``. The server and agent are shut down at teardown, and the
  agent's containers (by owner label) removed. The test runs with ``egress.no_egress``
  (what the agent runs itself has no way out; loopback HTTP is exempt).

``LiveServer`` helpers: ``token(role)`` (a token of that role, minted once through the
token store), ``client(role | None)`` (a ``Client``), ``raw(request_bytes)`` (one raw
HTTP exchange on a fresh socket -> ``RawResponse``).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from egress import no_egress

from mcp_node.agent import Agent
from mcp_node.client import Client
from mcp_node.config import AgentConfig
from mcp_node.server import AgentServer, serve

__all__ = ["SMALL_BODY", "LiveServer", "RawResponse", "raw_http", "live_server"]

SMALL_BODY = 64 * 1024


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _read_response(f: Any) -> RawResponse:
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed without a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(f.readline().strip(), 16)
            if size == 0:
                f.readline()
                break
            body += f.read(size)
            f.readline()
    else:
        body = f.read(int(headers.get("content-length", "0")))
    return RawResponse(status, headers, body)


def raw_http(address: tuple[str, int], data: bytes, responses: int = 1,
             timeout: float = 30) -> list[RawResponse]:
    """Send ``data`` as-is on a new connection and read ``responses`` responses."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        f = s.makefile("rb")
        return [_read_response(f) for _ in range(responses)]


@dataclass
class LiveServer:
    agent: Agent
    server: AgentServer
    url: str
    operator_token: str
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return str(self.server.server_address[0]), int(self.server.server_address[1])

    def token(self, role: str) -> str:
        if role == "operator":
            return self.operator_token
        if role not in self._tokens:
            self._tokens[role] = self.server.tokens.add(f"{role}-{uuid.uuid4().hex[:6]}", role)
        return self._tokens[role]

    def client(self, role: str | None = "operator") -> Client:
        return Client(self.url, None if role is None else self.token(role), timeout=60)

    def raw(self, data: bytes, responses: int = 1) -> list[RawResponse]:
        return raw_http(self.address, data, responses)

    def request(self, method: str, path: str, body: bytes | None = None,
                role: str | None = "operator", headers: dict[str, str] | None = None
                ) -> RawResponse:
        h = {"Host": "127.0.0.1"}
        if role is not None:
            h["Authorization"] = f"Bearer {self.token(role)}"
        if body is not None:
            h["Content-Length"] = str(len(body))
        h.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        return self.raw(head.encode("latin-1") + b"Connection: close\r\n\r\n" + (body or b""))[0]


@pytest.fixture
def live_server(podman_config: AgentConfig, podman_cleanup: Any,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    no_egress(monkeypatch)   # for what the in-process agent runs itself (podman CLI)
    cfg = replace(podman_config, server=replace(podman_config.server, listen="127.0.0.1:0",
                                                max_body=SMALL_BODY))
    agent = Agent(cfg)
    podman_cleanup.add(agent.owner)
    srv = serve(agent, cfg)
    try:
        assert srv.token_file is not None
        token = srv.token_file.read_text().strip()
        yield LiveServer(agent, srv, srv.url, token)
    finally:
        srv.shutdown()
        agent.close()
