"""End to end: a service with a container and a unikernel VM component, through the
``mcp-agent`` daemon (a real process, SIGKILLed and restarted) and the ``mcp`` CLI.

- initramfs (a Linux guest, ~10 s per boot under TCG): one boot shared by the steps,
  in order: deploy → both answer → ps/status/logs/health → SIGKILL agent → same qemu
  pid → SIGKILL qemu → drift → redeploy over a busy host refused → stop → undeploy.
- Nanos (``$MCP_NANOS_DIR``, else ../shared/nanos), once on q35 and once on microvm
  (a boot takes under a second): deploy → HTTP through the VM's port (env reached the
  program) → status names the builder and what stop does → logs show the console →
  stop → start → restart → SIGKILL agent, same qemu pid → SIGKILL qemu, drift →
  start → undeploy leaves no process, port or directory. On microvm, volumes are
  refused naming the field and nothing changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_env import Daemon, free_port, refused
from podman_env import wait_http
from qemu_env import (
    VMReaper,
    kernel_path,
    nanos_dir,
    need_nanos,
    need_qemu,
    qemu_pids_in,
    wait_gone,
)

from mcp_node.errors import MCPError
from mcp_node.files import host_memory_mb

pytestmark = pytest.mark.integration

MONITOR_S = 0.5


def _daemon(tmp_path: Path, podman_socket: str, qemu: str) -> Iterator[Daemon]:
    from podman_env import containers_conf

    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = "{containers_conf()}"\n'
        f'[qemu]\n{qemu}accel = "tcg"\n'
        f"[monitor]\ninterval_s = {MONITOR_S}\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    d = Daemon(state, conf, free_port())
    reaper = VMReaper()
    reaper.watch(state)
    try:
        yield d
    finally:
        d.stop()
        d.remove_containers()
        reaper.run()


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    need_qemu()
    yield from _daemon(tmp_path, podman_socket, f'kernel = "{kernel_path()}"\n')


@pytest.fixture(params=["q35", "microvm"])
def nanos_daemon(request: pytest.FixtureRequest, tmp_path: Path,
                 podman_socket: str) -> Iterator[tuple[Daemon, str]]:
    need_nanos()
    machine = str(request.param)
    for d in _daemon(tmp_path, podman_socket,
                     f'nanos_dir = "{nanos_dir()}"\nmachine = "{machine}"\n'):
        yield d, machine


def definition(tmp_path: Path, svc: str, image: str, memory_mb: int = 192,
               vm_extra: str = "") -> Path:
    path = tmp_path / f"{svc}.toml"
    path.write_text(f"""name = "{svc}"

[[components]]
name = "api"
image = "{image}"
env = ["MESSAGE=container"]
[[components.routes]]
port = 8080

[[components]]
name = "vm"
image = "{image}"
runtime = "unikernel"
memory_mb = {memory_mb}
env = ["MESSAGE=unikernel"]
{vm_extra}
[[components.routes]]
port = 8081
""")
    return path


def node_health(daemon: Daemon) -> dict[str, Any]:
    """``mcp --json node health`` (a row per asked node; here the one agent)."""
    rows = json.loads(daemon.mcp("--json", "node", "health").output)
    row: dict[str, Any] = rows[0] if isinstance(rows, list) else rows
    return row


def comp(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in st["components"] if c["component"] == name)


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_container_and_vm_service_end_to_end(daemon: Daemon, tmp_path: Path,
                                             hello_image: str) -> None:
    client = daemon.start()
    svc = f"u{uuid.uuid4().hex[:8]}"
    # restart = "no": a killed VM stays down and shows as drift (the reconciler's
    # automatic restart is tested with it)
    defn = definition(tmp_path, svc, hello_image, vm_extra='restart = "no"')

    # deploy: both components run, each on its own 127.0.0.1 port
    result = daemon.mcp("deploy", str(defn))
    assert result.exit_code == 0, result.output + daemon.log()
    st = client.get(f"/v1/services/{svc}")
    api_port = comp(st, "api")["routes"][0]["host_port"]
    vm_port = comp(st, "vm")["routes"][0]["host_port"]
    assert wait_http(api_port) == "hello from container\n"
    assert wait_http(vm_port, timeout=120) == "hello from unikernel\n"

    # ps: RUNTIME unikernel and STATE running for the VM, container for the other (once
    # the agent's checker saw the guest accept: it probes on its own ticks)
    deadline = time.monotonic() + 30
    while True:
        ps = daemon.mcp("ps").output
        rows = {line.split()[1]: line.split() for line in ps.splitlines()[1:]
                if line.startswith(svc + " ")}
        if rows["vm"][4] != "starting" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows["vm"][3:5] == ["unikernel", "running"], ps
    assert rows["api"][3:5] == ["container", "running"], ps

    # status: image SHA-256, memory, vCPUs, accel (and pid, builder)
    text = daemon.mcp("status", svc).output
    line = next(x for x in text.splitlines() if x.startswith("  vm: "))
    for key in ("memory_mb=192", "vcpus=1", "accel=tcg", "builder=initramfs"):
        assert key in line.split(), text
    assert re.search(r" image_sha256=[0-9a-f]{64} ", line), text
    m = re.search(r" pid=(\d+) ", line)
    assert m, text
    pid = int(m.group(1))
    assert qemu_pids_in(daemon.state) == [pid]

    # logs: the serial console
    logs = daemon.mcp("logs", svc, "vm", "--tail", "50").output
    assert f"hello: listening on :{vm_port}" in logs and "mcp-init: started" in logs

    # health: which runtimes and which accel the node has
    health = node_health(daemon)
    vm_rt = health["runtimes"]["unikernel"]
    assert vm_rt["available"] is True and vm_rt["accel"] == "tcg"
    assert vm_rt["builder"] == "initramfs" and vm_rt["vms_running"] == 1

    # SIGKILL the agent, start it again: same qemu pid, still running, still answering
    daemon.kill()
    assert wait_http(vm_port) == "hello from unikernel\n"
    client = daemon.start()
    vm = comp(client.get(f"/v1/services/{svc}"), "vm")
    assert vm["state"] == "running" and vm["pid"] == pid and not vm["drift"]

    # SIGKILL qemu: drift is reported by the monitor, without anyone asking it to list
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    killed_at = time.monotonic()
    health = wait_for(lambda: (h := client.get("/v1/health"))["drifted"] and h, 10 * MONITOR_S,
                      "drift in health")
    print(f"drift seen {time.monotonic() - killed_at:.2f}s after the kill "
          f"(monitor interval {MONITOR_S}s)")
    assert f"{svc}/vm" in health["drifted"] and health["status"] == "degraded"
    vm = comp(client.get(f"/v1/services/{svc}"), "vm")
    assert vm["state"] == "stopped" and vm["drift"] is True
    events = client.get(f"/v1/services/{svc}")["events"]
    assert any(e["component"] == "vm" and e["to"] == "stopped" for e in events)

    # start brings the VM back (a new pid); the container was left alone
    result = daemon.mcp("start", svc)
    assert result.exit_code == 0, result.output
    assert wait_http(vm_port, timeout=120) == "hello from unikernel\n"
    new_pid = comp(client.get(f"/v1/services/{svc}"), "vm")["pid"]
    assert new_pid and new_pid != pid

    # a redeploy that would overcommit memory is refused with the numbers; nothing changes
    big = definition(tmp_path, svc, hello_image, memory_mb=host_memory_mb(),
                     vm_extra='restart = "no"')
    result = daemon.mcp("deploy", str(big))
    assert result.exit_code == 1 and "MiB" in result.output and "reserve" in result.output
    assert comp(client.get(f"/v1/services/{svc}"), "vm")["pid"] == new_pid
    assert wait_http(vm_port) == "hello from unikernel\n"

    # mcp stop: both stopped, no qemu left, no port listening
    result = daemon.mcp("stop", svc)
    assert result.exit_code == 0, result.output
    st = client.get(f"/v1/services/{svc}")
    assert {c["component"]: c["state"] for c in st["components"]} == {
        "api": "stopped", "vm": "stopped"}
    assert qemu_pids_in(daemon.state) == [] and wait_gone(new_pid, 1)
    assert refused(vm_port) and refused(api_port)

    # undeploy: the VM's state directory is gone too
    result = daemon.mcp("undeploy", svc)
    assert result.exit_code == 0, result.output
    assert not (daemon.state / "vms" / f"{svc}-vm").exists()
    assert svc not in daemon.mcp("ps").output


def test_unikernel_refusals_leave_nothing(daemon: Daemon, tmp_path: Path,
                                          hello_image: str) -> None:
    """memory_mb = 0, a digest-pin mismatch, an image without the ELF: clear errors, and
    no VM, no state directory and no registry row afterwards. No VM boots here."""
    client = daemon.start()
    svc = f"r{uuid.uuid4().hex[:8]}"

    def deploy(**vm: object) -> str:
        body = {"name": svc, "components": [{
            "name": "vm", "image": hello_image, "runtime": "unikernel", "memory_mb": 128,
            "routes": [{"port": 8080}], **vm}]}
        with pytest.raises(MCPError) as err:
            client.post("/v1/services", body)
        return str(err.value)

    cases = [
        (dict(memory_mb=0), "memory_mb"),
        (dict(image_sha256="0" * 64), "digest mismatch"),
        (dict(binary="/usr/local/bin/missing"), "/usr/local/bin/missing not found in image"),
        (dict(name="Bad_Name"), "components[0].name"),
    ]
    for vm, message in cases:
        error = deploy(**vm)
        assert message in error, (vm, error)
        assert svc not in daemon.mcp("ps").output
        assert qemu_pids_in(daemon.state) == []
        vms = daemon.state / "vms"
        assert not vms.exists() or [p.name for p in vms.iterdir()] == []
    with pytest.raises(MCPError):
        client.get(f"/v1/services/{svc}")


def stop_text(machine: str) -> str:
    from mcp_node.vmstate import stop_text

    return stop_text(machine, 10.0)


def test_nanos_service_end_to_end(nanos_daemon: tuple[Daemon, str], tmp_path: Path,
                                  hello_image: str) -> None:
    daemon, machine = nanos_daemon
    client = daemon.start()
    svc = f"n{uuid.uuid4().hex[:8]}"
    # restart = "no": a killed VM stays down, so the drift is there to be seen (an
    # automatic restart is the reconciler's business, tested with it)
    defn = definition(tmp_path, svc, hello_image, vm_extra='restart = "no"')

    def vm() -> dict[str, Any]:
        return comp(client.get(f"/v1/services/{svc}"), "vm")

    def running_pid() -> int:
        deadline = time.monotonic() + 30   # ready once the agent's checker saw it accept
        v = vm()
        while v["state"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.2)
            v = vm()
        assert v["state"] == "running" and not v["drift"], v
        assert qemu_pids_in(daemon.state) == [v["pid"]]
        return int(v["pid"])

    # deploy: the container and the Nanos VM answer, each on its own port; the VM says
    # what its environment told it (env reached the program)
    result = daemon.mcp("deploy", str(defn))
    assert result.exit_code == 0, result.output + daemon.log()
    api_port = comp(client.get(f"/v1/services/{svc}"), "api")["routes"][0]["host_port"]
    vm_port = vm()["routes"][0]["host_port"]
    assert wait_http(api_port) == "hello from container\n"
    assert wait_http(vm_port, timeout=60) == "hello from unikernel\n"
    pid = running_pid()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-machine") + 1].startswith(machine.encode())

    # status names the builder and what a stop does on this machine type; logs: console
    v = vm()
    assert v["builder"] == "nanos" and v["accel"] == "tcg" and v["memory_mb"] == 192
    assert v["stop"] == stop_text(machine) and len(v["image_sha256"]) == 64
    text = daemon.mcp("status", svc).output
    assert "builder=nanos" in text and f"pid={pid}" in text and "stop=power button" in text
    logs = daemon.mcp("logs", svc, "vm").output
    assert f"hello: listening on :{vm_port}" in logs and "assigned 10.0.2.15" in logs, logs
    health = node_health(daemon)
    vm_rt = health["runtimes"]["unikernel"]
    assert vm_rt["builder"] == "nanos" and vm_rt["machine"] == machine
    assert vm_rt["stop"] == stop_text(machine) and vm_rt["vms_running"] == 1

    if machine == "microvm":
        # volumes: refused before anything changes, naming the field
        host = daemon.state / "volumes" / "data"
        host.mkdir(parents=True)
        bad = definition(tmp_path, svc, hello_image,
                         vm_extra=f'restart = "no"\nvolumes = ["{host}:/data"]')
        result = daemon.mcp("deploy", str(bad))
        assert result.exit_code == 1 and "volumes" in result.output, result.output
        assert "microvm" in result.output
        assert running_pid() == pid and wait_http(vm_port) == "hello from unikernel\n"

    # stop: both stopped, no qemu, no port; on q35 the guest powered itself off after
    # the program's SIGTERM handler ran
    result = daemon.mcp("stop", svc)
    assert result.exit_code == 0, result.output
    st = client.get(f"/v1/services/{svc}")
    assert {c["component"]: c["state"] for c in st["components"]} == {
        "api": "stopped", "vm": "stopped"}
    assert wait_gone(pid, 5) and qemu_pids_in(daemon.state) == []
    assert refused(vm_port) and refused(api_port)
    if machine == "q35":
        assert "hello: SIGTERM, shutting down" in daemon.mcp("logs", svc, "vm").output

    # start, then restart: each boots a new qemu that answers
    for op in ("start", "restart"):
        result = daemon.mcp(op, svc)
        assert result.exit_code == 0, op + result.output
        assert wait_http(vm_port, timeout=60) == "hello from unikernel\n", op
        new_pid = running_pid()
        assert new_pid != pid and wait_gone(pid, 5), op
        pid = new_pid

    # SIGKILL the agent, start it again: it re-adopts the same qemu pid
    daemon.kill()
    assert wait_http(vm_port) == "hello from unikernel\n"
    client = daemon.start()
    assert running_pid() == pid

    # SIGKILL qemu: the monitor reports drift
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    health = wait_for(lambda: (h := client.get("/v1/health"))["drifted"] and h, 10 * MONITOR_S,
                      "drift in health")
    assert f"{svc}/vm" in health["drifted"]
    v = vm()
    assert v["state"] == "stopped" and v["drift"] is True

    # start it again, then undeploy from running: no process, no port, no directory
    assert daemon.mcp("start", svc).exit_code == 0
    assert wait_http(vm_port, timeout=60) == "hello from unikernel\n"
    pid = running_pid()
    result = daemon.mcp("undeploy", svc)
    assert result.exit_code == 0, result.output
    assert wait_gone(pid, 5) and qemu_pids_in(daemon.state) == []
    assert refused(vm_port) and refused(api_port)
    assert not (daemon.state / "vms" / f"{svc}-vm").exists()
    assert svc not in daemon.mcp("ps").output
