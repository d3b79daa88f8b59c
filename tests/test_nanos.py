"""The nanos builder against the real Nanos (``$MCP_NANOS_DIR``, else ../shared/nanos),
through QemuRuntime: volumes shared live over 9p on q35, env and arguments reaching
the program exactly, a real mkfs image that ``dump`` reads back; volumes refused on
microvm before anything changes. Nanos boots in under a second under TCG, so these
cost little; the whole lifecycle through mcp-agent is in test_unikernel_e2e.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from podman_env import free_port, wait_http
from qemu_env import VMReaper, nanos_config, qemu_runtime, wait_gone

from mcp_node.config import QemuConfig
from mcp_node.errors import ValidationError
from mcp_node.grammar import Volume
from mcp_node.kvmprobe import boot_prints_mark, nanos_guest
from mcp_node.nanos import NanosBuilder
from mcp_node.netplan import NetAttach, ServiceNet
from mcp_node.runtime import STOPPED, WorkloadSpec
from mcp_node.vmimage import BuildRequest, sha256_file

pytestmark = pytest.mark.integration

NASTY = "it's a (test) \"x\" $HOME `id` ; done \\ end"
# busybox sh on Nanos: builtins only (Nanos has no fork). The program exits at the end,
# so the q35 guest powers itself off.
SCRIPT = """read line < /data/in.txt
echo "guest-read<$line>"
echo "guest-arg<$0>"
printf '%s' "$MESSAGE" > /data/out.txt
echo x > /ro/try || echo ro-refused
echo guest-done
"""


def vm_files(state: Path) -> list[str]:
    vms = state / "vms"
    return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


def hello_spec(image: str, message: str) -> tuple[WorkloadSpec, int]:
    """A hello VM answering "hello from <message>" on a free host port, and that port."""
    port = free_port()
    return WorkloadSpec(service=f"n{uuid.uuid4().hex[:8]}", component="web", image=image,
                        env=(f"PORT={port}", f"MESSAGE={message}"), ports=(port,),
                        memory_mb=128), port


def test_nanos_mkfs_image_holds_program_env_and_mount_points(tmp_path: Path,
                                                             nanos: Path) -> None:
    elf = tmp_path / "app.elf"
    elf.write_bytes(Path("/bin/busybox").read_bytes())
    data = tmp_path / "data"
    data.mkdir()
    req = BuildRequest(service="s", component="c", elf=elf, guest_path="/bin/busybox",
                       argv=("sh", "-c", "echo hi"), env=("PORT=8080", f"MESSAGE={NASTY}"),
                       volumes=(Volume(str(data), "/data"),), cache_dir=tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    plan = NanosBuilder(QemuConfig(nanos_dir=str(nanos))).build(req, out)
    assert plan.builder == "nanos" and plan.nanos and plan.kernel == ""
    assert Path(plan.disk).is_file() and plan.image == plan.disk and plan.sha256 == ""
    assert plan.volumes == req.volumes
    dump = subprocess.run([str(nanos / "dump"), plan.disk], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    assert "program:/bin/busybox" in dump.replace(" ", "")
    assert "virtfs0" in dump and "MESSAGE" in dump


def test_nanos_q35_volumes_env_and_args_reach_the_program(
        tmp_path: Path, nanos: Path, busybox_image: str) -> None:
    state = tmp_path / "state"
    data = tmp_path / "vol-data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    ro = tmp_path / "vol-ro"
    ro.mkdir()
    rt = qemu_runtime(nanos_config(state, "q35"))
    assert rt.builder_name == "nanos"
    spec = WorkloadSpec(
        service=f"n{uuid.uuid4().hex[:8]}", component="bb", image=busybox_image,
        cmd=("sh", "-c", SCRIPT, "arg with (space)"), env=(f"MESSAGE={NASTY}",),
        volumes=(f"{data}:/data", f"{ro}:/ro:ro"), memory_mb=128)
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        w = rt.run(spec)
        assert w.extra["builder"] == "nanos" and w.extra["machine"] == "q35"
        # the program ends after its script; a Nanos guest on q35 then powers itself off
        assert wait_gone(int(w.extra["pid"]), 60)
        console = b"".join(rt.logs(spec.service, spec.component)).decode(errors="replace")
        assert "guest-done" in console, console
        assert "guest-read<from the host>" in console          # 9p read
        assert (data / "out.txt").read_text() == NASTY          # 9p write, exact env
        assert "guest-arg<arg with (space)>" in console         # argv exact
        assert "ro-refused" in console and list(ro.iterdir()) == []
        after = rt.inspect(spec.service, spec.component)
        assert after is not None and after.state == STOPPED
    finally:
        reaper.run()


def test_nanos_microvm_refuses_volumes_before_anything_changes(
        tmp_path: Path, nanos: Path, busybox_image: str) -> None:
    state = tmp_path / "state"
    rt = qemu_runtime(nanos_config(state, "microvm"))
    spec = WorkloadSpec(service="n", component="bb", image=busybox_image,
                        volumes=(f"{tmp_path}:/data",), memory_mb=128)
    for call in (lambda: rt.check_capacity(spec, False), lambda: rt.pull(spec),
                 lambda: rt.run(spec)):
        with pytest.raises(ValidationError) as err:
            call()
        assert err.value.field == "volumes" and "microvm" in str(err.value)
    assert vm_files(state) == [] and not (state / "vm-cache").exists()


def test_nanos_microvm_stop_then_start_boots_the_same_image_again(
        tmp_path: Path, nanos: Path, hello_image: str) -> None:
    """start() relaunches a stopped VM from its image as it is: no rebuild (same digest),
    its console appended; a microvm guest, which cannot power off, is quit on stop."""
    state = tmp_path / "state"
    rt = qemu_runtime(nanos_config(state, "microvm"))
    spec, port = hello_spec(hello_image, "micro")
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        assert rt.start(spec.service, spec.component) is False     # nothing to start yet
        w = rt.run(spec)
        assert wait_http(port, timeout=60) == "hello from micro\n"
        assert w.spec_digest == spec.digest and w.extra["machine"] == "microvm"
        assert "cannot power off" in w.extra["stop"] and rt.graceful_stop is False
        rt.stop(spec.service, spec.component)
        assert wait_gone(int(w.extra["pid"]), 5)
        assert rt.inspect(spec.service, spec.component).state == STOPPED  # type: ignore[union-attr]
        assert rt.start(spec.service, spec.component) is True
        assert wait_http(port, timeout=60) == "hello from micro\n"
        again = rt.inspect(spec.service, spec.component)
        assert again is not None and again.extra["pid"] != w.extra["pid"]
        assert again.extra["image_sha256"] == w.extra["image_sha256"]
        console = b"".join(rt.logs(spec.service, spec.component)).decode(errors="replace")
        assert console.count(f"hello: listening on :{port}") == 2
        # a rebuild of the same inputs has the same digest, so pinning it works
        pinned = rt.run(replace(spec, image_sha256=w.extra["image_sha256"]))
        assert pinned.extra["image_sha256"] == w.extra["image_sha256"]
        assert wait_http(port, timeout=60) == "hello from micro\n"
    finally:
        reaper.run()


def test_kvm_probe_boots_a_nanos_guest_and_auto_accel_follows_it(tmp_path: Path,
                                                                 nanos: Path) -> None:
    """On a Nanos node the probe's second stage is a Nanos image whose program prints the
    mark (here the stub runs under KVM but Nanos stops with a KVM internal error, so
    without this stage auto picked kvm and no VM ever answered)."""
    for machine in ("q35", "microvm"):
        work = tmp_path / machine
        work.mkdir()
        argv = nanos_guest(nanos, machine).argv(work, "qemu-system-x86_64", "tcg")
        ok, why = boot_prints_mark(argv, 60)     # the guest itself is sound: under TCG
        assert ok, (machine, why)
    rt = qemu_runtime(nanos_config(tmp_path / "state", "microvm", accel="auto"))
    accel = rt.accel
    verdict = json.loads((tmp_path / "state" / "vms" / ".accel-probe.json").read_text())
    assert accel == ("kvm" if verdict["ok"] else "tcg")
    assert verdict["ok"] or "KVM" in verdict["why"] or "kvm" in verdict["why"], verdict
    assert "nanos:" in verdict["key"] and ":microvm" in verdict["key"]


def test_nanos_image_is_reproducible_so_a_pin_can_hold(tmp_path: Path, nanos: Path) -> None:
    """Same inputs, same bytes (mkfs without ASLR, its random UUIDs replaced by ones
    derived from the manifest); another env, another digest."""
    elf = tmp_path / "app.elf"
    elf.write_bytes(Path("/bin/busybox").read_bytes())
    builder = NanosBuilder(QemuConfig(nanos_dir=str(nanos)))

    def build(name: str, env: tuple[str, ...], net: NetAttach | None = None) -> str:
        out = tmp_path / name
        out.mkdir()
        req = BuildRequest(service="s", component="c", elf=elf, guest_path="/bin/busybox",
                           env=env, net=net)
        return sha256_file(Path(builder.build(req, out).image))

    one, two = build("a", ("PORT=8080",)), build("b", ("PORT=8080",))
    assert one == two
    assert build("c", ("PORT=8081",)) != one
    # On a service network: the resolver's file is in the image, the address is not (the
    # guest takes it by DHCP), so both addresses of a start-first pair build one image.
    net = ServiceNet("s", 3, "10.89.0.0/16", {"c": 2, "c.next": 5})
    bridged = build("d", ("PORT=8080",), net.attach("c", vm=True))
    assert bridged != one
    assert build("e", ("PORT=8080",), net.attach("c.next", vm=True)) == bridged


def back_to_back(port: int, n: int) -> int:
    """How many of n connection-per-request GETs, one after another, got hello's answer
    (stops at the first that does not come within 5 s)."""
    for i in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                got = b""
                while chunk := c.recv(4096):
                    got += chunk
        except OSError:
            return i
        if not got.endswith(b"hello from burst\n"):
            return i
    return n


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_nanos_guest_keeps_answering_a_burst_of_connections(
        tmp_path: Path, nanos: Path, hello_image: str, machine: str) -> None:
    """With EVENT_IDX on its virtio-net-pci, a q35 Nanos guest stopped answering for good
    after 200-1,600 back-to-back connections through user-mode (its RX ring refilled
    without the kick QEMU waited for); the agent could only restart it. microvm's mmio
    driver took them with EVENT_IDX on: its case guards that it still does."""
    rt = qemu_runtime(nanos_config(tmp_path / "state", machine))
    spec, port = hello_spec(hello_image, "burst")
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        rt.run(spec)
        assert wait_http(port, timeout=60) == "hello from burst\n"
        assert back_to_back(port, 3000) == 3000
    finally:
        reaper.run()
