"""End to end: a service with a container and a unikernel VM component, through the
``mcp-agent`` daemon (a real process, SIGKILLed and restarted) and the ``mcp`` CLI.

One VM boot (~10 s under TCG) is shared by the steps, which run in order in one test:
deploy → both answer → ps/status/logs/health → SIGKILL agent → same qemu pid →
SIGKILL qemu → drift → redeploy over a busy host refused → stop → undeploy.
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
from qemu_env import VMReaper, kernel_path, need_qemu, qemu_pids_in, wait_gone

from mcp_node.errors import MCPError
from mcp_node.vmstate import host_memory_mb

pytestmark = pytest.mark.integration

MONITOR_S = 0.5


@pytest.fixture
def daemon(tmp_path: Path, podman_socket: str) -> Iterator[Daemon]:
    need_qemu()
    from podman_env import containers_conf

    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[podman]\nsocket = "{podman_socket}"\ncontainers_conf = "{containers_conf()}"\n'
        f'[qemu]\nkernel = "{kernel_path()}"\naccel = "tcg"\n'
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


def definition(tmp_path: Path, svc: str, image: str, memory_mb: int = 192) -> Path:
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
[[components.routes]]
port = 8081
""")
    return path


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
    defn = definition(tmp_path, svc, hello_image)

    # deploy: both components run, each on its own 127.0.0.1 port
    result = daemon.mcp("deploy", str(defn))
    assert result.exit_code == 0, result.output + daemon.log()
    st = client.get(f"/v1/services/{svc}")
    api_port = comp(st, "api")["routes"][0]["host_port"]
    vm_port = comp(st, "vm")["routes"][0]["host_port"]
    assert wait_http(api_port) == "hello from container\n"
    assert wait_http(vm_port, timeout=120) == "hello from unikernel\n"

    # ps: RUNTIME unikernel and STATE running for the VM, container for the other
    ps = daemon.mcp("ps").output
    rows = {line.split()[1]: line.split() for line in ps.splitlines()[1:]
            if line.startswith(svc + " ")}
    assert rows["vm"][3:5] == ["unikernel", "running"], ps
    assert rows["api"][3:5] == ["container", "running"], ps

    # status: image SHA-256, memory, vCPUs, accel (and pid, builder)
    text = daemon.mcp("status", svc).output
    m = re.search(r"vm: image_sha256=([0-9a-f]{64}) memory_mb=192 vcpus=1 accel=tcg "
                  r"pid=(\d+) builder=initramfs", text)
    assert m, text
    pid = int(m.group(2))
    assert qemu_pids_in(daemon.state) == [pid]

    # logs: the serial console
    logs = daemon.mcp("logs", svc, "vm", "-n", "50").output
    assert f"hello: listening on :{vm_port}" in logs and "mcp-init: started" in logs

    # health: which runtimes and which accel the node has
    health = json.loads(daemon.mcp("--json", "node", "health").output)
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
    big = definition(tmp_path, svc, hello_image, memory_mb=host_memory_mb())
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
