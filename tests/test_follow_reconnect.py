"""``mcp events -f`` and ``mcp logs -f`` go on across an agent restart and a replace
(issue 18), or end saying why.

The agent is a daemon process SIGKILLed and started again on the same port; the
follower is the real ``mcp`` CLI as a child process, read line by line with a
deadline. Before, both ended at the kill with ``bad chunk size line b''``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from daemon_env import Daemon, podman_daemon
from egress import no_egress_env

WAIT_S = 60.0


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    with podman_daemon(tmp_path, podman_socket) as d:
        yield d


class Follower:
    """``mcp ... -f`` as a process; its stdout and stderr lines in queues."""

    def __init__(self, d: Daemon, *args: str, reconnect_s: float = WAIT_S) -> None:
        env = {**no_egress_env(), "MCP_FOLLOW_RECONNECT_S": str(reconnect_s)}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mcp"), "--agent", d.url, "--token-file",
             str(d.state / "token"), *args], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out.put),
                                        daemon=True),
                       threading.Thread(target=self._pump, args=(self.proc.stderr,
                                                                 self.err.append), daemon=True)]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(f: IO[bytes], put: object) -> None:
        for raw in f:
            put(raw.decode(errors="replace"))  # type: ignore[operator]

    def until(self, want: str, why: str) -> list[str]:
        """Lines up to the first one containing ``want``."""
        seen: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{why}: no {want!r} in {seen}; stderr {self.err}"
            try:
                line = self.out.get(timeout=min(left, 1.0))
            except queue.Empty:
                assert self.proc.poll() is None, \
                    f"{why}: follower ended: {seen}; stderr {self.err}"
                continue
            seen.append(line)
            if want in line:
                return seen

    def noted(self, want: str, why: str) -> None:
        """Until stderr has a line containing ``want`` (the follower's own notes)."""
        deadline = time.monotonic() + WAIT_S
        while not any(want in e for e in self.err):
            assert time.monotonic() < deadline, f"{why}: no {want!r} in {self.err}"
            assert self.proc.poll() is None, f"{why}: follower ended; stderr {self.err}"
            time.sleep(0.1)

    def wait(self) -> int:
        """Its exit status, once it ended by itself and all it wrote was read."""
        code = self.proc.wait(timeout=WAIT_S)
        for t in self._pumps:
            t.join(timeout=WAIT_S)
        return code

    def rest(self) -> list[str]:
        """The stdout lines not taken by ``until`` yet."""
        out = []
        while not self.out.empty():
            out.append(self.out.get())
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def hit(port: int, path: str) -> None:
    """One request to the hello server: it logs ``hello: GET <path>``."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                r.read()
                return
        except OSError:
            assert time.monotonic() < deadline, f"port {port} never answered"
            time.sleep(0.2)


def deploy(d: Daemon, svc: str, image: str, message: str) -> int:
    client = d.start() if d.proc is None or d.proc.poll() is not None else None
    assert client is None or client   # started above if it was not running
    from mcp_node.client import Client
    c = Client(d.url, (d.state / "token").read_text().strip())
    c.post("/v1/services", {"name": svc, "components": [
        {"name": "web", "image": image, "env": [f"MESSAGE={message}"],
         "routes": [{"port": 8080}]}]})
    deadline = time.monotonic() + WAIT_S
    while True:
        [row] = c.get(f"/v1/services/{svc}")["components"]
        if row["state"] == "running":
            return int(row["routes"][0]["host_port"])
        assert time.monotonic() < deadline, row
        time.sleep(0.2)


def test_events_follow_resumes_after_an_agent_restart(daemon: Daemon,
                                                      hello_image: str) -> None:
    daemon.start()
    svc = f"ev{uuid.uuid4().hex[:6]}"
    deploy(daemon, svc, hello_image, "one")
    f = Follower(daemon, "events", "-f", svc, "--json")
    try:
        first = [json.loads(x) for x in f.until('"running"', "the deploy's events")]
        daemon.kill()
        daemon.start()
        client = daemon.mcp("restart", svc)   # new events while the follower reconnects
        assert client.exit_code == 0, client.output
        later = [json.loads(x) for x in f.until('"running"', "events after the restart")]
        ids = [e["id"] for e in first + later]
        assert ids == sorted(set(ids)), ids          # none twice, in order
        assert any("reconnect" in e for e in f.err), f.err
        assert not any("bad chunk" in e for e in f.err), f.err
    finally:
        f.stop()


def test_logs_follow_goes_on_across_an_agent_restart_and_a_replace(
        daemon: Daemon, hello_image: str) -> None:
    daemon.start()
    svc = f"lg{uuid.uuid4().hex[:6]}"
    port = deploy(daemon, svc, hello_image, "one")
    f = Follower(daemon, "logs", "-f", svc)
    try:
        hit(port, "/before")
        f.until("/before", "a line before the kill")
        daemon.kill()
        daemon.start()
        f.noted("reconnected", "the follower after the agent restarted")
        hit(port, "/after-restart")   # (a line written before it reconnected is not shown)
        f.until("/after-restart", "a line after the agent restarted")
        port = deploy(daemon, svc, hello_image, "two")     # a replace: a new container
        f.noted("replaced", "the follower after the replace")
        hit(port, "/after-replace")
        f.until("/after-replace", "a line of the new container")
        assert daemon.mcp("stop", svc).exit_code == 0
        f.proc.wait(timeout=WAIT_S)      # stopped for good: it ends, saying so
        assert any("desired stopped" in e for e in f.err), f.err
    finally:
        f.stop()


def test_follow_ends_saying_why_when_the_agent_stays_away(daemon: Daemon,
                                                          hello_image: str) -> None:
    daemon.start()
    f = Follower(daemon, "events", "-f", reconnect_s=3)
    try:
        time.sleep(0.5)    # the stream is open (an early kill would fail the open itself)
        daemon.kill()
        code = f.proc.wait(timeout=WAIT_S)
        time.sleep(0.2)
        assert code != 0
        text = "".join(f.err)
        assert "did not answer again within 3 s" in text, text
        assert "Traceback" not in text and "bad chunk" not in text, text
    finally:
        f.stop()
        os.environ.pop("MCP_FOLLOW_RECONNECT_S", None)


def test_after_must_be_an_event_id(daemon: Daemon) -> None:
    from mcp_node.errors import RemoteError

    client = daemon.start()
    for bad in ("x", "-1", "1" * 20):
        with pytest.raises(RemoteError) as info:
            client.stream("/v1/events", params={"follow": "1", "after": bad})
        assert info.value.status == 400 and "after" in str(info.value) + info.value.code, \
            (bad, info.value.status, str(info.value))
        with pytest.raises(RemoteError) as info:   # checked without follow too
            client.get("/v1/events", params={"after": bad})
        assert info.value.status == 400, (bad, info.value.status, str(info.value))
    assert client.get("/v1/events", params={"after": "9" * 19}) == []   # no 500
