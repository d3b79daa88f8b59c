"""Transport failures read as a short cause, not an exception repr (issue 18).

etcd: real sockets on this machine, a port nothing listens on (refused) and one
that accepts and never answers (timed out); the no-quorum refusal names the
endpoint and says what happened in a few words, no ``ConnectionError(MaxRetryError(``.
podman: the agent's own podman service SIGKILLed under it; the error of the next
call says so, no ``('Connection aborted.', APIError(...))``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_node.causes import transport_cause
from mcp_node.cluster import Etcd
from mcp_node.config import ClusterConfig, from_dict
from mcp_node.errors import FleetUnavailable, WorkloadError
from mcp_node.podman import PodmanRuntime

SOUP = re.compile(r"MaxRetryError|HTTPConnectionPool|ConnectionError\(|object at 0x|"
                  r"Caused by|\('|\(\"")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refusal(port: int) -> str:
    etcd = Etcd(ClusterConfig(etcd=(f"http://127.0.0.1:{port}",), timeout_s=0.5))
    with pytest.raises(FleetUnavailable) as info:
        etcd.get("/k")
    return str(info.value)


def test_refused_connection_reads_as_a_short_cause() -> None:
    port = closed_port()
    text = refusal(port)
    assert text.startswith("etcd is unreachable or has no quorum "
                           f"(http://127.0.0.1:{port}: connection refused)"), text
    assert not SOUP.search(text), text


def test_a_peer_gone_mid_request_reads_as_a_short_cause() -> None:
    import http.client

    from urllib3.exceptions import ProtocolError

    gone = ProtocolError("Connection aborted.", http.client.RemoteDisconnected(
        "Remote end closed connection without response"))
    assert transport_cause(gone) == "connection closed without a response"


def test_timeout_reads_as_a_short_cause(silent_port: int) -> None:
    text = refusal(silent_port)
    assert text.startswith("etcd is unreachable or has no quorum "
                           f"(http://127.0.0.1:{silent_port}: read timed out"), text
    assert not SOUP.search(text), text


def test_podman_transport_failure_reads_as_a_short_cause(tmp_path: Path,
                                                         podman_binary: None) -> None:
    runtime = PodmanRuntime(from_dict({}), tmp_path / "st", f"cause-{uuid.uuid4().hex[:8]}")
    try:
        assert runtime.list() == []
        pid = runtime.service.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)     # the service this runtime started, by its pid
        with pytest.raises(WorkloadError) as info:
            runtime.list()
        text = str(info.value)
        assert text.startswith("podman list containers: "), text
        assert not SOUP.search(text) and "APIError" not in text, text
        # which one depends on where the kill caught the service (seen: each of them)
        assert text.endswith(("connection refused", "no such file or directory",
                              "connection reset by peer",
                              "connection closed without a response")), text
    finally:
        runtime.close()
