"""Operations cut short by a SIGKILL of the ``mcp-agent`` daemon (a real process), which
the restarted agent must finish with no operator action (issue 18).

- A VM whose agent died between launching qemu (``-S``: CPUs held while the image is
  hashed) and its ``cont``: found paused in ``prelaunch``. The kill is placed exactly
  there: the test holds the VM's QMP socket (qemu serves one client), sees
  ``prelaunch``, and kills the agent while its ``cont`` waits behind that connection.
  Then, before any daemon runs again, ``mcp --local status`` must say the VM is not
  running (and it must still be paused: no reconcile there); after the restart the same
  qemu must be let run, its guest answering on its port and its image digest recorded.
  In-process, a guest paused through QMP (another state that is not running) is seen so
  by a runtime that did not launch it, stopped without a power-button wait, or resumed;
  one in a state ``cont`` is not for (``postmigrate``: its state handed off through
  QMP ``migrate``) is booted again; and the pause of a launch in progress is the
  launch's own: listings do not ask QMP.
- An undeploy killed at seeded random points (``MCP_UNDEPLOY_CRASH_ROUNDS`` rounds,
  default 4, the first killed at once; ``MCP_CRASH_SEED`` replays one run): after the
  restart the service is either fully undeployed (no record, no container of it) when
  the kill came after the undeploy's first registry write, or fully deployed and
  running when it came before;
  never a record left with workloads half removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from daemon_env import Daemon, free_port
from podman_env import podman_cli, wait_http
from qemu_env import VMReaper, nanos_config, nanos_dir, need_nanos, qemu_pids_in, qemu_runtime

from mcp_node import qmp
from mcp_node.cli import cli
from mcp_node.errors import MCPError
from mcp_node.registry import Registry
from mcp_node.runtime import LABEL_OWNER, WorkloadSpec

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("MCP_UNDEPLOY_CRASH_ROUNDS", "4"))
CONVERGE_S = 60.0


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_config(tmp_path: Path, podman_socket: str, qemu: str = "") -> tuple[Path, Path]:
    from podman_env import containers_conf

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[state]\ndir = "{state}"\n'
        f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = "{containers_conf()}"\n'
        f'{qemu}[monitor]\ninterval_s = 0.3\n')
    return conf, state


@contextlib.contextmanager
def running(conf: Path, state: Path) -> Iterator[Daemon]:
    d = Daemon(state, conf, free_port())
    reaper = VMReaper()
    reaper.watch(state)
    try:
        yield d
    finally:
        d.stop()
        d.remove_containers()
        reaper.run()


# --------------------------------------------------------------------------- paused VM


class HeldQMP:
    """A QMP session kept open: while it lasts, qemu answers no other client."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = self._connect(path)
                break
            except OSError:   # not created yet, or not listening yet
                assert time.monotonic() < deadline, f"no QMP socket at {path}"
                time.sleep(0.005)
        self.io = self.sock.makefile("rwb")
        self._reply()                                   # the greeting
        self.call("qmp_capabilities")

    @staticmethod
    def _connect(path: Path) -> socket.socket:
        dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(10)
            s.connect(f"/proc/self/fd/{dirfd}/{path.name}")   # sun_path is 108 bytes
        except OSError:
            s.close()
            raise
        finally:
            os.close(dirfd)
        return s

    def _reply(self) -> dict[str, Any]:
        while True:
            msg: dict[str, Any] = json.loads(self.io.readline())
            if "event" not in msg:
                return msg

    def call(self, command: str) -> Any:
        self.io.write(json.dumps({"execute": command}).encode() + b"\n")
        self.io.flush()
        return self._reply()["return"]

    def close(self) -> None:
        self.io.close()
        self.sock.close()


def test_vm_left_in_prelaunch_by_a_killed_agent_is_resumed(tmp_path: Path,
                                                           podman_socket: str,
                                                           hello_image: str) -> None:
    need_nanos()
    conf, state = write_config(tmp_path, podman_socket,
                               f'[qemu]\nnanos_dir = "{nanos_dir()}"\nmachine = "q35"\n'
                               'accel = "tcg"\n')
    svc = f"p{uuid.uuid4().hex[:8]}"
    # restart = "no": resuming a guest that never ran is not a restart
    body = {"name": svc, "components": [
        {"name": "vm", "image": hello_image, "runtime": "unikernel", "memory_mb": 192,
         "restart": "no", "env": ["MESSAGE=unikernel"], "routes": [{"port": 8081}]}]}
    with running(conf, state) as daemon:
        client = daemon.start()

        def deploy() -> None:
            with contextlib.suppress(MCPError):   # the agent dies under it
                client.post("/v1/services", body)

        t = threading.Thread(target=deploy, daemon=True)
        t.start()
        sock = state / "vms" / f"{svc}-vm" / "qmp.sock"
        held = HeldQMP(sock, timeout=120)   # the image is built first: the ELF, mkfs
        try:
            status = held.call("query-status")["status"]
            assert status == "prelaunch", f"the guest ran before the kill: {status}"
            daemon.kill()                   # its cont waits behind our session
        finally:
            held.close()
        t.join(timeout=30)
        pids = qemu_pids_in(state)
        assert len(pids) == 1, pids
        assert qmp.execute(sock, "query-status")["status"] == "prelaunch"

        # No daemon runs: the local view must not claim the paused VM runs.
        out = CliRunner().invoke(cli, ["--local", "--json", "status", svc],
                                 env={"MCP_AGENT_CONFIG": str(conf)},
                                 catch_exceptions=False)
        assert out.exit_code == 0, out.output
        vm = json.loads(out.output)["components"][0]
        assert vm["state"] == "stopped" and vm["drift"] and not vm["ready"], vm
        assert qmp.execute(sock, "query-status")["status"] == "prelaunch"   # left alone

        # Restarted, with no operator action: the same qemu is let run and answers.
        client = daemon.start()

        def converged() -> dict[str, Any] | None:
            c = client.get(f"/v1/services/{svc}")["components"][0]
            return c if c["state"] == "running" and not c["drift"] else None

        vm = wait_for(converged, CONVERGE_S, f"{svc}/vm running\n{daemon.log()[-3000:]}")
        assert qmp.execute(sock, "query-status")["status"] == "running"
        assert qemu_pids_in(state) == pids and vm["pid"] == pids[0]   # resumed, not replaced
        assert wait_http(vm["routes"][0]["host_port"], timeout=60) == "hello from unikernel\n"
        assert len(vm["image_sha256"]) == 64   # hashed before the guest first ran
        meta = json.loads((state / "vms" / f"{svc}-vm" / "meta.json").read_text())
        assert meta["image_sha256"] == vm["image_sha256"]
        assert "found prelaunch" in json.dumps(client.get(f"/v1/events?service={svc}"))
        assert daemon.mcp("undeploy", svc).exit_code == 0
        assert qemu_pids_in(state) == []


def test_a_guest_paused_through_qmp_is_seen_by_a_new_runtime_and_resumed(
        tmp_path: Path, hello_image: str, caplog: pytest.LogCaptureFixture) -> None:
    need_nanos()
    config = nanos_config(tmp_path / "state", "q35")
    port = free_port()
    spec = WorkloadSpec(service=f"q{uuid.uuid4().hex[:8]}", component="web",
                        image=hello_image, env=(f"PORT={port}", "MESSAGE=paused"),
                        ports=(port,), memory_mb=128)
    reaper = VMReaper()
    first = qemu_runtime(config)
    reaper.add(first, spec.service, spec.component)
    try:
        pid = first.run(spec).extra["pid"]
        assert wait_http(port, timeout=60) == "hello from paused\n"
        sock = Path(first.inspect(spec.service, spec.component).extra["state_dir"]) / "qmp.sock"
        qmp.execute(sock, "stop")
        again = qemu_runtime(config)   # a restarted agent: it did not let this guest run
        [w] = again.list()
        assert (w.state, w.paused, w.extra["pid"]) == ("stopped", "paused", pid)
        w = again.inspect(spec.service, spec.component)
        assert w is not None and (w.state, w.paused) == ("stopped", "paused")
        assert again.start(spec.service, spec.component)
        w = again.inspect(spec.service, spec.component)
        assert w is not None and (w.state, w.paused, w.extra["pid"]) == ("running", "", pid)
        assert wait_http(port) == "hello from paused\n"
        qmp.execute(sock, "stop")
        # stop: the power button cannot reach halted CPUs, so it is not waited for
        with caplog.at_level(logging.INFO, logger="mcp_node.qemu"):
            qemu_runtime(config).stop(spec.service, spec.component, timeout=30)
        assert "power button, waiting up to 0.0s" in caplog.text
        assert qemu_pids_in(config.state_dir) == []
    finally:
        reaper.run()


def test_a_guest_that_cont_is_not_for_is_booted_again(tmp_path: Path,
                                                      hello_image: str) -> None:
    need_nanos()
    config = nanos_config(tmp_path / "state", "q35")
    port = free_port()
    spec = WorkloadSpec(service=f"m{uuid.uuid4().hex[:8]}", component="web",
                        image=hello_image, env=(f"PORT={port}", "MESSAGE=again"),
                        ports=(port,), memory_mb=128)
    first = qemu_runtime(config)
    reaper = VMReaper()
    reaper.add(first, spec.service, spec.component)
    try:
        old = first.run(spec).extra["pid"]
        sock = config.state_dir / "vms" / f"{spec.service}-web" / "qmp.sock"
        qmp.execute(sock, "migrate", {"uri": "exec:cat > /dev/null"})
        wait_for(lambda: qmp.execute(sock, "query-status")["status"] == "postmigrate", 30,
                 "the migration to end")
        again = qemu_runtime(config)
        [w] = again.list()
        assert (w.state, w.paused) == ("stopped", "postmigrate")
        assert again.start(spec.service, spec.component)
        w = again.inspect(spec.service, spec.component)
        assert w is not None and w.state == "running" and w.extra["pid"] != old
        assert qemu_pids_in(config.state_dir) == [w.extra["pid"]]
        assert wait_http(port, timeout=60) == "hello from again\n"
    finally:
        reaper.run()


def test_a_launch_in_progress_is_not_reported_as_found_paused(tmp_path: Path,
                                                              hello_image: str) -> None:
    need_nanos()
    config = nanos_config(tmp_path / "state", "q35")
    port = free_port()
    spec = WorkloadSpec(service=f"l{uuid.uuid4().hex[:8]}", component="web",
                        image=hello_image, env=(f"PORT={port}", "MESSAGE=launch"),
                        ports=(port,), memory_mb=128)
    rt = qemu_runtime(config)
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    ran: list[Any] = []
    t = threading.Thread(target=lambda: ran.append(rt.run(spec)), daemon=True)
    try:
        t.start()
        sock = config.state_dir / "vms" / f"{spec.service}-web" / "qmp.sock"
        held = HeldQMP(sock, timeout=120)
        try:
            assert held.call("query-status")["status"] == "prelaunch"
            # Asking QMP now would wait behind our session and come back unreachable.
            [w] = rt.list()
            assert (w.state, w.paused, w.extra.get("qmp_status")) == ("running", "",
                                                                     "running")
        finally:
            held.close()   # the launch's cont goes through
        t.join(timeout=60)
        assert ran and ran[0].state == "running"
        assert wait_http(port, timeout=60) == "hello from launch\n"
    finally:
        reaper.run()


# --------------------------------------------------------------------------- undeploy


def containers_of(owner: str, svc: str) -> dict[str, str]:
    out = podman_cli("ps", "-a", "--format", "json", "--filter",
                     f"label={LABEL_OWNER}={owner}").stdout
    return {e["Names"][0]: str(e["State"]) for e in json.loads(out or "[]")
            if e["Names"][0].startswith(f"mcp-{svc}-")}


def record(state: Path, svc: str) -> Any:
    reg = Registry(state / "registry.db")
    try:
        return next((r for r in reg.list_services() if r.name == svc), None)
    finally:
        reg.close()


def test_undeploy_killed_at_random_points_ends_before_or_after(
        tmp_path: Path, podman_socket: str, hello_image: str) -> None:
    conf, state = write_config(tmp_path, podman_socket)
    seed = int(os.environ.get("MCP_CRASH_SEED") or random.randrange(2**32))
    print(f"seed {seed} ({ROUNDS} rounds; MCP_CRASH_SEED={seed} replays them)")
    rng = random.Random(seed)
    svc = f"u{uuid.uuid4().hex[:8]}"
    names = ("a", "b", "c")
    body = {"name": svc, "components": [
        {"name": c, "image": hello_image, "env": [f"MESSAGE={c}"], "routes": [{"port": 8080}]}
        for c in names]}
    with running(conf, state) as daemon:
        client = daemon.start()
        owner = daemon.owner
        # The first undeploy runs to its end: how long one takes bounds the kill points.
        client.post("/v1/services", body)
        t0 = time.monotonic()
        client.delete(f"/v1/services/{svc}")
        took = time.monotonic() - t0
        assert record(state, svc) is None and containers_of(owner, svc) == {}
        outcomes = []
        for rnd in range(ROUNDS):
            client.post("/v1/services", body)
            assert set(containers_of(owner, svc).values()) == {"running"}
            # Every other round early (the first 20 ms: around the intent, written a few ms
            # in); the first at once, before the request can have reached the agent.
            delay = rng.uniform(0, took * 1.2 if rnd % 2 else 0.02) if rnd else 0.0
            done = threading.Event()

            def undeploy(c: Any = client) -> None:
                with contextlib.suppress(MCPError):   # the agent may die under it
                    c.delete(f"/v1/services/{svc}")
                    done.set()

            th = threading.Thread(target=undeploy, daemon=True)
            th.start()
            finished = done.wait(delay)
            daemon.kill()
            th.join(timeout=30)
            rec = record(state, svc)
            # The undeploy's intent is its first registry write: every component stopped.
            intent = rec is None or all(c.desired_state == "stopped" for c in rec.components)
            left = containers_of(owner, svc)
            why = (f"round {rnd} seed {seed}: killed after {delay:.3f}s of {took:.3f}s "
                   f"(finished={finished}), record={'gone' if rec is None else 'kept'}, "
                   f"intent={intent}, left={left}")
            print(why, flush=True)
            client = daemon.start()

            def ended(want_gone: bool = intent) -> bool:
                r, have = record(state, svc), containers_of(owner, svc)
                if want_gone:
                    return r is None and have == {}
                return r is not None and all(c.desired_state == "running"
                                             for c in r.components) and \
                    set(have) == {f"mcp-{svc}-{c}" for c in names} and \
                    set(have.values()) == {"running"}

            wait_for(ended, CONVERGE_S, f"{why}: not before nor after\n{daemon.log()[-3000:]}")
            outcomes.append("after" if intent else "before")
            if not intent:   # still deployed: what runs answers
                st = client.get(f"/v1/services/{svc}")
                for c in st["components"]:
                    port = c["routes"][0]["host_port"]
                    assert wait_http(port) == f"hello from {c['component']}\n"
        print(f"outcomes: {outcomes}")
