"""Log reads are bounded in bytes as well as lines (issue 16), against real components: a
busybox container writes a 30 MB log through a daemon agent with its own podman service;
reads with and without tail, six at once, answer at most ``server.max_log_bytes``, the
newest lines, streamed, and neither the agent's nor podman's memory grows by the log's
size (peak RSS from /proc/<pid>/status). A VM's serial console (a real file of the same
kind) is read the same way."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_env import Daemon
from podman_env import containers_conf

from mcp_node import podman_logread as podman_mod
from mcp_node.client import Client
from mcp_node.errors import MCPError
from mcp_node.files import read_cmdline
from mcp_node.logtail import notice
from mcp_node.podman import PodmanRuntime
from mcp_node.runtime import WorkloadSpec
from mcp_node.vmstate import VMDir, read_console

CAP = 1 << 20
LINES = 150_000          # "%07d " + 200 x: 30 MB of output, ~37 MB of k8s-file log
PAD = "x" * 200


def line(i: int) -> bytes:
    return b"%07d %s\n" % (i, PAD.encode())


def kib(pid: int, field: str) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@pytest.fixture
def daemon(tmp_path: Path, busybox_image: str) -> Iterator[tuple[Daemon, Client, int]]:
    """A daemon agent that starts its own podman service (its pid is in the state dir),
    with a 1 MiB log cap; yields (daemon, client, podman service pid)."""
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[server]\nmax_log_bytes = {CAP}\n'
                    f'[podman]\ncontainers_conf = "{containers_conf()}"\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    d = Daemon(state, conf)
    service_pid = 0
    try:
        client = d.start()
        service_pid = int((state / "podman" / "service.pid").read_text())
        yield d, client, service_pid
    finally:
        d.stop()
        d.remove_containers()
        argv = read_cmdline(service_pid) if service_pid else []
        if "system" in argv and "service" in argv:   # the agent left it running: by pid
            os.kill(service_pid, signal.SIGTERM)


def get(d: Daemon, client: Client, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    conn.request("GET", path, headers={"Authorization": f"Bearer {client.token}"})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def test_reads_of_a_big_container_log_are_capped_and_streamed(
        daemon: tuple[Daemon, Client, int], busybox_image: str) -> None:
    d, client, podman_pid = daemon
    name = f"big{uuid.uuid4().hex[:6]}"
    script = (f'awk \'BEGIN {{ for (i = 0; i < {LINES}; i++) printf "%07d {PAD}\\n", i }}\'; '
              "echo END; exec sleep 600")
    try:
        client.post("/v1/services", {"name": name, "components": [
            {"name": "web", "image": busybox_image, "cmd": ["sh", "-c", script]}]})
    except MCPError as exc:
        pytest.fail(f"deploy: {exc}\n{d.log()[-4000:]}")
    deadline = time.monotonic() + 180
    while True:                                   # the whole log is written
        try:
            status, _, body = get(d, client, f"/v1/services/{name}/logs?tail=1")
            if status == 200 and body == b"END\n":
                break
        except (OSError, MCPError):
            pass
        assert time.monotonic() < deadline, "the container did not write its log in time"
        time.sleep(0.5)
    agent_pid = d.proc.pid if d.proc else 0
    agent_before, podman_before = kib(agent_pid, "VmHWM"), kib(podman_pid, "VmHWM")

    status, headers, last = get(d, client, f"/v1/services/{name}/logs?tail=3")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    assert last == line(LINES - 2) + line(LINES - 1) + b"END\n"

    answers: dict[str, bytes] = {}

    def read(key: str, query: str) -> None:
        answers[key] = get(d, client, f"/v1/services/{name}/logs{query}")[2]

    readers = [threading.Thread(target=read, args=(f"r{i}", "?tail=10000" if i % 2 else ""))
               for i in range(6)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in readers)
    whole = answers["r0"]                          # no tail: the newest CAP bytes
    assert len(whole) <= CAP and whole.startswith(notice(CAP)) and whole.endswith(b"END\n")
    body = whole[len(notice(CAP)):]
    rest = body[body.index(b"\n") + 1:].removesuffix(b"END\n")   # the cut may split a line
    n = len(rest) // len(line(0))
    assert n > 4000 and rest == b"".join(line(i) for i in range(LINES - n, LINES))
    tailed = answers["r1"]                         # 10,000 lines are 2 MB: cut at 1 MiB too
    assert len(tailed) <= CAP and tailed.startswith(notice(CAP)) and tailed.endswith(b"END\n")
    assert all(answers[f"r{i}"] == answers[f"r{i % 2}"] for i in range(6))
    # Six reads of a 37 MB log: neither process went near its size (the agent used to
    # hold each answer whole, podman each tail).
    assert kib(agent_pid, "VmHWM") - agent_before < 16 << 10
    assert kib(podman_pid, "VmHWM") - podman_before < 16 << 10
    res = d.mcp("logs", name, "--tail", "2")
    assert res.exit_code == 0 and res.stdout_bytes == line(LINES - 1) + b"END\n"


def test_a_big_serial_console_is_read_from_its_end(tmp_path: Path) -> None:
    vm = VMDir(tmp_path / "vm")
    vm.path.mkdir()
    with vm.console.with_name("console.log.1").open("wb") as f:
        for i in range(60_000):                    # 12 MB rotated part ...
            f.write(b"old %07d %s\r\n" % (i, PAD.encode()))
    with vm.console.open("wb") as f:               # ... and 12 MB current one
        for i in range(60_000):
            f.write(b"new %07d %s\r\n" % (i, PAD.encode()))
    tracemalloc.start()
    try:
        whole = b"".join(read_console(vm, None, False, lambda: False, CAP))
        tailed = b"".join(read_console(vm, 2, False, lambda: False, CAP))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(whole) <= CAP and whole.startswith(notice(CAP))
    assert whole.endswith(b"new 0059999 " + PAD.encode() + b"\n") and b"\r" not in whole
    assert tailed == b"".join(b"new %07d %s\n" % (i, PAD.encode()) for i in (59998, 59999))
    assert peak < 4 * CAP, peak                    # the answers themselves, not the file


def test_a_log_only_podman_can_read_keeps_the_last_cap_bytes(
        podman_runtime: PodmanRuntime, busybox_image: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """journald, or a file the agent may not open: podman is asked, and the agent keeps
    only the newest ``max_bytes`` of its answer (podman's own memory is not bounded)."""
    monkeypatch.setattr(podman_mod, "k8s_log_path", lambda attrs: None)
    spec = WorkloadSpec(service=f"t{uuid.uuid4().hex[:8]}", component="web",
                        image=busybox_image, stop_timeout_s=1, cmd=("sh", "-c", (
                            f'awk \'BEGIN {{ for (i = 0; i < 5000; i++) printf "%07d {PAD}\\n",'
                            " i }'; echo END; exec sleep 600")))
    podman_runtime.run(spec)
    deadline = time.monotonic() + 60
    while b"".join(podman_runtime.logs(spec.service, "web", tail=1)) != b"END\n":
        assert time.monotonic() < deadline, "the container did not write its log in time"
        time.sleep(0.2)
    cap = 64 << 10
    out = b"".join(podman_runtime.logs(spec.service, "web", max_bytes=cap))
    assert len(out) <= cap and out.startswith(notice(cap)) and out.endswith(line(4999) + b"END\n")
    assert b"".join(podman_runtime.logs(spec.service, "web", tail=2, max_bytes=cap)) == \
        line(4999) + b"END\n"
