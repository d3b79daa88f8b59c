"""The QMP wrapper over qemu.qmp: against a real qemu (paused, so nothing boots) and
against a peer speaking QMP's wire protocol (greeting, ``qmp_capabilities``, ids echoed)
for what a healthy qemu never sends: errors, a wrong greeting, garbage, silence at each
step, a hang-up."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from qemu.qmp import QMPError as LibQMPError

from mcp_node import qmp
from mcp_node.errors import WorkloadError


def test_real_qemu_status_cont_and_errors(paused_qemu: Path) -> None:
    assert len(str(paused_qemu)) > 108
    assert qmp.execute(paused_qemu, "query-status")["status"] == "prelaunch"
    assert qmp.execute(paused_qemu, "cont") == {}
    assert qmp.execute(paused_qemu, "query-status")["status"] == "running"
    with pytest.raises(qmp.QMPError, match="CommandNotFound"):
        qmp.execute(paused_qemu, "no-such-command")
    with pytest.raises(qmp.QMPError, match="GenericError|invalid|Invalid"):
        qmp.execute(paused_qemu, "human-monitor-command", {"bogus": 1})
    # a hyphenated argument name reaches qemu as it is
    out = qmp.execute(paused_qemu, "human-monitor-command", {"command-line": "info status"})
    assert "running" in out
    # events sent before the answer (STOP) are skipped, the answer still comes back
    assert qmp.execute(paused_qemu, "stop") == {}
    assert qmp.execute(paused_qemu, "query-status")["status"] == "paused"


def test_real_qemu_concurrent_calls_are_serialised(paused_qemu: Path) -> None:
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: qmp.execute(paused_qemu, "query-status")["status"],
                            range(24)))
    assert got == ["prelaunch"] * 24


# -- a peer speaking the wire protocol ------------------------------------------------------

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""},
                    "capabilities": ["oob"]}}
Handler = Callable[[dict], list[bytes] | None]   # request -> lines to send; None: go silent


def line(msg: object) -> bytes:
    return json.dumps(msg).encode() + b"\n"


def answer(req: dict, **msg: object) -> bytes:
    return line({**msg, "id": req["id"]} if "id" in req else msg)


def healthy(command_reply: Handler) -> Handler:
    """Negotiates as qemu does, then lets ``command_reply`` answer the command."""
    def handle(req: dict) -> list[bytes] | None:
        if req.get("execute") == "qmp_capabilities":
            return [answer(req, **{"return": {}})]
        return command_reply(req)
    return handle


def requests(conn: socket.socket) -> Iterator[dict]:
    """The JSON objects the client sends: a stream, as QEMU parses it (no newlines)."""
    dec, buf = json.JSONDecoder(), ""
    while (chunk := conn.recv(65536)):
        buf += chunk.decode()
        while (buf := buf.lstrip()):
            try:
                obj, end = dec.raw_decode(buf)
            except ValueError:
                break        # incomplete: read on
            buf = buf[end:]
            yield obj


class Peer:
    """A unix-socket QMP server thread; ``requests`` holds what the client sent."""

    def __init__(self, path: Path, handle: Handler, greeting: bytes | None = None) -> None:
        self.requests: list[dict] = []
        self.hold = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.greeting = line(GREETING) if greeting is None else greeting
        self.handle = handle
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.srv:
            conn, _ = self.srv.accept()
            with conn:
                if self.greeting == b"":
                    self.hold.wait(10)     # silent from the start
                    return
                conn.sendall(self.greeting)
                for req in requests(conn):
                    self.requests.append(req)
                    out = self.handle(req)
                    if out is None:
                        self.hold.wait(10)
                        return
                    if out == [b"HANGUP"]:
                        return
                    conn.sendall(b"".join(out))

    def close(self) -> None:
        self.hold.set()
        self.thread.join(10)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(handle: Handler, greeting: bytes | None = None) -> Peer:
        made.append(Peer(tmp_path / "qmp.sock", handle, greeting))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_answer_after_events_with_arguments(tmp_path: Path, peer: Callable[..., Peer]) -> None:
    p = peer(healthy(lambda req: [
        line({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}),
        answer(req, **{"return": {"status": "paused", "running": False}})]))
    got = qmp.execute(tmp_path / "qmp.sock", "query-status", {"x-arg": 1})
    assert got == {"status": "paused", "running": False}
    caps, cmd = p.requests
    assert caps["execute"] == "qmp_capabilities" and caps["arguments"] == {"enable": ["oob"]}
    assert cmd["execute"] == "query-status" and cmd["arguments"] == {"x-arg": 1}


@pytest.mark.parametrize("greeting,handle,match", [
    (line({"not": "qmp"}), healthy(lambda req: []), "Greeting"),
    (None, healthy(lambda req: [
        line({"event": "X", "timestamp": {"seconds": 1, "microseconds": 0}}),
        answer(req, error={"class": "GenericError", "desc": "no"})]), "GenericError: no"),
    (None, healthy(lambda req: [b"not json\n"]), "query-status on"),
    (None, lambda req: [answer(req, error={"class": "GenericError", "desc": "caps"})],
     "Negotiation"),
    (None, healthy(lambda req: [b"HANGUP"]), "query-status on"),          # hangs up
    (b"", healthy(lambda req: []), "no answer in time"),      # silent: another client's turn
    (None, lambda req: None, "no answer in time"),            # qmp_capabilities unanswered
    (None, healthy(lambda req: None), "no answer in time"),   # the command unanswered
])
def test_peer_failures_are_qmp_errors_with_their_cause(
        tmp_path: Path, peer: Callable[..., Peer], greeting: bytes | None, handle: Handler,
        match: str) -> None:
    peer(handle, greeting)
    with pytest.raises(qmp.QMPError, match=match) as exc:
        qmp.execute(tmp_path / "qmp.sock", "query-status", timeout=0.5)
    assert isinstance(exc.value, WorkloadError) and exc.value.status == 502
    assert isinstance(exc.value.__cause__, (LibQMPError, OSError, EOFError, TimeoutError))


def test_no_descriptor_or_event_loop_left_behind(tmp_path: Path,
                                                 peer: Callable[..., Peer]) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(20):
        with pytest.raises(qmp.QMPError):
            qmp.execute(tmp_path / "none.sock", "query-status")
    p = peer(healthy(lambda req: [answer(req, **{"return": {}})]))
    seen: list[object] = []

    def in_thread() -> None:
        qmp.execute(tmp_path / "qmp.sock", "cont")
        import asyncio
        try:
            seen.append(asyncio.get_event_loop())
        except RuntimeError:
            seen.append(None)    # no loop left set on the thread

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(10)
    p.close()
    assert seen == [None]
    assert fds() == before


def test_missing_socket_is_a_qmp_error(tmp_path: Path) -> None:
    with pytest.raises(qmp.QMPError, match="No such file") as exc:
        qmp.execute(tmp_path / "none.sock", "query-status")
    assert isinstance(exc.value.__cause__, OSError)
    with pytest.raises(qmp.QMPError):
        qmp.execute(tmp_path / "no-dir" / "qmp.sock", "query-status")
