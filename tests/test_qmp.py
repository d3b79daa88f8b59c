"""The synchronous QMP client: against a real qemu (paused, so nothing boots) and against
a scripted peer for what a healthy qemu never sends (errors, a wrong greeting, silence)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from mcp_node import qmp


def test_real_qemu_status_cont_and_errors(paused_qemu: Path) -> None:
    assert len(str(paused_qemu)) > 108
    assert qmp.execute(paused_qemu, "query-status")["status"] == "prelaunch"
    assert qmp.execute(paused_qemu, "cont") == {}
    assert qmp.execute(paused_qemu, "query-status")["status"] == "running"
    with pytest.raises(qmp.QMPError, match="CommandNotFound"):
        qmp.execute(paused_qemu, "no-such-command")
    with pytest.raises(qmp.QMPError, match="GenericError|invalid|Invalid"):
        qmp.execute(paused_qemu, "human-monitor-command", {"bogus": 1})
    # events sent before the answer (STOP) are skipped, the answer still comes back
    assert qmp.execute(paused_qemu, "stop") == {}
    assert qmp.execute(paused_qemu, "query-status")["status"] == "paused"


def scripted_peer(path: Path, lines: list[bytes], hold: threading.Event) -> threading.Thread:
    """A one-connection server that sends ``lines`` (one per client line read, the first
    at once) and then keeps the connection open until ``hold`` is set."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            f = conn.makefile("rb")
            for i, line in enumerate(lines):
                if i:
                    f.readline()
                conn.sendall(line)
            hold.wait(10)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


GREETING = json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n"


@pytest.mark.parametrize("lines,match", [
    ([b'{"not": "qmp"}\n'], "not a QMP greeting"),
    ([GREETING, b'{"return": {}}\n',
      b'{"event": "X", "timestamp": {}}\n{"error": {"class": "GenericError", "desc": "no"}}\n'],
     "GenericError: no"),
    ([GREETING, b'{"return": {}}\n', b"not json\n"], "QMP"),
    ([GREETING, b'{"return": {}}\n'], "timed out|no answer in time"),   # then silence
])
def test_scripted_peer_failures_are_qmp_errors(tmp_path: Path, lines: list[bytes],
                                               match: str) -> None:
    hold = threading.Event()
    t = scripted_peer(tmp_path / "qmp.sock", lines, hold)
    try:
        with pytest.raises(qmp.QMPError, match=match):
            qmp.execute(tmp_path / "qmp.sock", "query-status", timeout=0.5)
    finally:
        hold.set()
        t.join(10)


def test_missing_socket_is_a_qmp_error(tmp_path: Path) -> None:
    with pytest.raises(qmp.QMPError):
        qmp.execute(tmp_path / "none.sock", "query-status")
    with pytest.raises(qmp.QMPError):
        qmp.execute(tmp_path / "no-dir" / "qmp.sock", "query-status")
