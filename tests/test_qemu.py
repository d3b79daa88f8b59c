"""QemuRuntime with real qemu under TCG, through the Runtime API the agent uses.

Boots are slow under TCG (~10 s), so two VMs are shared by the tests of this module, in
file order: ``hello_vm`` (the test image's HTTP server; lifecycle, recovery, refusals,
SIGKILL, redeploy, cooperative stop, remove) and ``bb_vm`` (a busybox script guest:
9p volumes, env/argv quoting, console rotation, a guest that ignores the power button).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from podman_env import free_port, podman_cli, wait_http
from qemu_env import VMReaper, kernel_path, need_qemu, qemu_config, qemu_runtime, wait_gone

from mcp_node.errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    ResourceError,
    RuntimeUnavailable,
    ValidationError,
)
from mcp_node.files import host_memory_mb
from mcp_node.kvmprobe import (
    PROBE_MARK,
    boot_prints_mark,
    kernel_probe_argv,
    linux_guest,
    probe_argv,
    probe_image,
    probe_initramfs,
    probe_kvm,
)
from mcp_node.qemu import QemuRuntime
from mcp_node.runtime import RUNNING, STOPPED, WorkloadSpec

pytestmark = pytest.mark.integration


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def vm_files(state: Path) -> list[str]:
    vms = state / "vms"
    return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


@dataclass
class Booted:
    rt: QemuRuntime
    state: Path
    spec: WorkloadSpec
    port: int

    @property
    def dir(self) -> Path:
        return self.state / "vms" / f"{self.spec.service}-{self.spec.component}"

    def pid(self) -> int:
        meta = json.loads((self.dir / "meta.json").read_text())
        return int(Path(meta.get("pidfile") or self.dir / "qemu.pid").read_text())

    def console(self) -> str:
        return (self.dir / "console.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def hello_vm(tmp_path_factory: pytest.TempPathFactory,
             hello_images: dict[str, str]) -> Iterator[Booted]:
    need_qemu()
    state = tmp_path_factory.mktemp("qemu-state")
    rt = qemu_runtime(qemu_config(state))
    port = free_port()
    spec = WorkloadSpec(service=f"t{uuid.uuid4().hex[:8]}", component="web-a",
                        image=hello_images["v1"], env=(f"PORT={port}", "MESSAGE=the vm"),
                        ports=(port,), memory_mb=192)
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        rt.pull(spec)
        rt.run(spec)
        wait_http(port, timeout=120)
        yield Booted(rt, state, spec, port)
    finally:
        reaper.run()


# -- enablement (no boot) ----------------------------------------------------------------------

def test_available_with_qemu_and_a_kernel(tmp_path: Path, qemu_kernel: Path) -> None:
    rt = qemu_runtime(qemu_config(tmp_path))
    assert rt.available() == (True, "")
    assert rt.builder_name == "initramfs"
    info = rt.info()
    assert info["available"] is True and info["accel"] == "tcg"
    assert info["builder"] == "initramfs" and info["host_memory_mb"] == host_memory_mb()


def test_unavailable_names_what_is_missing_and_refuses_run(tmp_path: Path) -> None:
    cfg = qemu_config(tmp_path, binary="/nonexistent/qemu-system-x86_64",
                      kernel=str(tmp_path / "no-vmlinuz"), ops=str(tmp_path / "no-ops"))
    rt = qemu_runtime(cfg)
    ok, why = rt.available()
    assert not ok
    assert "qemu binary" in why and "no-vmlinuz" in why and "ops" in why and "Nanos" in why
    spec = WorkloadSpec(service="x", component="y", image="localhost/none:v1", memory_mb=64)
    with pytest.raises(RuntimeUnavailable, match="qemu binary"):
        rt.run(spec)
    assert vm_files(tmp_path) == []


def test_initramfs_on_microvm_refused_before_anything_changes(tmp_path: Path,
                                                             qemu_kernel: Path) -> None:
    rt = qemu_runtime(qemu_config(tmp_path, machine="microvm"))
    assert rt.builder_name == "initramfs"
    spec = WorkloadSpec(service="x", component="y", image="localhost/none:v1", memory_mb=64)
    for call in (lambda: rt.check_capacity(spec, False), lambda: rt.pull(spec),
                 lambda: rt.run(spec)):
        with pytest.raises(ValidationError) as err:
            call()
        assert err.value.field == "qemu.machine" and "microvm" in str(err.value)
    assert vm_files(tmp_path) == [] and not (tmp_path / "vm-cache").exists()


def test_kvm_probe_stub_prints_under_tcg_and_accel_follows_the_probe(
        tmp_path: Path, qemu_kernel: Path) -> None:
    """The probe's stub really boots (checked under TCG); auto-accel is what the KVM probe says."""
    img = tmp_path / "probe.bin"
    img.write_bytes(probe_image())
    proc = subprocess.Popen(probe_argv("qemu-system-x86_64", "tcg", str(img)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out = b""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while PROBE_MARK not in out and time.monotonic() < deadline:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            out += chunk
    finally:
        proc.kill()
        proc.wait(10)
    assert PROBE_MARK in out
    # stage 2's kernel + busybox initramfs prints the mark too (under TCG, where it runs)
    initrd = tmp_path / "probe.cpio.gz"
    initrd.write_bytes(probe_initramfs(Path("/bin/busybox").read_bytes()))
    ok, why = boot_prints_mark(kernel_probe_argv("qemu-system-x86_64", "tcg", str(kernel_path()),
                                                 str(initrd)), 120)
    assert ok, why
    ok, why = probe_kvm("qemu-system-x86_64",
                        guest=linux_guest(kernel_path(), Path("/bin/busybox")))
    rt = qemu_runtime(qemu_config(tmp_path, accel="auto"))
    assert rt.accel == ("kvm" if ok else "tcg")
    assert ok or why
    cached = json.loads((tmp_path / "vms" / ".accel-probe.json").read_text())
    assert cached["ok"] is ok
    assert qemu_runtime(qemu_config(tmp_path, accel="auto")).accel == rt.accel


# -- the hello VM ------------------------------------------------------------------------------

def test_vm_answers_and_inspect_reports_it(hello_vm: Booted) -> None:
    assert wait_http(hello_vm.port) == "hello from the vm\n"
    w = hello_vm.rt.inspect(hello_vm.spec.service, hello_vm.spec.component)
    assert w is not None and w.state == RUNNING and w.runtime == "unikernel"
    pid = hello_vm.pid()
    sha = hashlib.sha256((hello_vm.dir / "image" / "initrd.img").read_bytes()).hexdigest()
    assert w.extra["pid"] == pid and w.extra["accel"] == "tcg"
    assert w.extra["image_sha256"] == sha and w.extra["builder"] == "initramfs"
    assert w.extra["memory_mb"] == 192 and w.extra["vcpus"] == 1
    assert w.extra["qmp_status"] == "running"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"192M" in argv and b"guest=mcp-" + hello_vm.spec.service.encode() + b"-web-a" in argv
    meta = json.loads((hello_vm.dir / "meta.json").read_text())
    assert (meta["service"], meta["component"]) == (hello_vm.spec.service, "web-a")


def test_list_and_info_see_the_running_vm(hello_vm: Booted) -> None:
    ws = [w for w in hello_vm.rt.list() if w.service == hello_vm.spec.service]
    assert len(ws) == 1 and ws[0].state == RUNNING and ws[0].extra["pid"] == hello_vm.pid()
    info = hello_vm.rt.info()
    assert info["vms_running"] >= 1 and info["memory_mb_used"] >= 192


def test_logs_tail_and_follow(hello_vm: Booted) -> None:
    svc, comp = hello_vm.spec.service, hello_vm.spec.component
    assert b"hello: listening on :%d" % hello_vm.port in b"".join(hello_vm.rt.logs(svc, comp))
    last = b"".join(hello_vm.rt.logs(svc, comp, tail=1))
    assert last.count(b"\n") == 1
    got: list[bytes] = []
    seen = threading.Event()
    mark = f"/mark-{uuid.uuid4().hex[:6]}"

    def follow() -> None:
        for chunk in hello_vm.rt.logs(svc, comp, tail=0, follow=True):
            got.append(chunk)
            if mark.encode() in b"".join(got):
                seen.set()
                return

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.5)
    wait_http(hello_vm.port, mark)
    assert seen.wait(30), b"".join(got)
    with pytest.raises(NotFoundError):
        list(hello_vm.rt.logs(svc, "nope"))


def test_a_new_runtime_readopts_the_running_vm(hello_vm: Booted) -> None:
    pid = hello_vm.pid()
    again = qemu_runtime(qemu_config(hello_vm.state))
    w = again.inspect(hello_vm.spec.service, hello_vm.spec.component)
    assert w is not None and w.state == RUNNING and w.extra["pid"] == pid
    assert [x.extra["pid"] for x in again.list()] == [pid]
    assert wait_http(hello_vm.port) == "hello from the vm\n"


def test_pid_reuse_is_not_mistaken_for_the_vm(hello_vm: Booted) -> None:
    """A pidfile naming a live process that is not this VM's qemu means stopped."""
    fake = hello_vm.state / "vms" / "fake-x"
    fake.mkdir()
    try:
        meta = json.loads((hello_vm.dir / "meta.json").read_text())
        meta.update(service="fake", component="x", pidfile="")   # its own qemu.pid
        (fake / "meta.json").write_text(json.dumps(meta))
        for pid in (os.getpid(), hello_vm.pid()):   # alive non-qemu; another VM's qemu
            (fake / "qemu.pid").write_text(str(pid))
            w = hello_vm.rt.inspect("fake", "x")
            assert w is not None and w.state == STOPPED and w.extra["pid"] is None
        hello_vm.rt.stop("fake", "x")              # must not signal either process
        assert hello_vm.rt.inspect(hello_vm.spec.service, "web-a").state == RUNNING  # type: ignore[union-attr]
    finally:
        (fake / "qemu.pid").unlink()
        (fake / "meta.json").unlink()
        fake.rmdir()


def test_pairs_sharing_a_directory_name_conflict(hello_vm: Booted) -> None:
    other = (f"{hello_vm.spec.service}-web", "a")   # also maps to <service>-web-a
    spec = replace(hello_vm.spec, service=other[0], component=other[1])
    pid = hello_vm.pid()
    with pytest.raises(ConflictError, match="belongs to service"):
        hello_vm.rt.run(spec)
    for op in (hello_vm.rt.inspect, hello_vm.rt.stop, hello_vm.rt.remove):
        with pytest.raises(ConflictError):
            op(*other)
    assert hello_vm.pid() == pid and not wait_gone(pid, 0.1)


def test_overcommit_refused_with_numbers(hello_vm: Booted) -> None:
    before = vm_files(hello_vm.state)
    big = replace(hello_vm.spec, component="big", memory_mb=host_memory_mb())
    with pytest.raises(ResourceError) as err:
        hello_vm.rt.check_capacity(big, replacing=False)
    msg = str(err.value)
    assert f"requested {host_memory_mb()} MiB" in msg and "192 MiB in 1 running VMs" in msg
    assert "512 MiB reserve" in msg and f"{host_memory_mb()} MiB on this host" in msg
    with pytest.raises(ResourceError):
        hello_vm.rt.run(big)
    cpus = replace(hello_vm.spec, component="cpus", vcpus=(os.cpu_count() or 1) + 1)
    with pytest.raises(ResourceError, match="vCPUs"):
        hello_vm.rt.run(cpus)
    # replacing the running VM with the same size is not counted twice
    hello_vm.rt.check_capacity(hello_vm.spec, replacing=True)
    assert vm_files(hello_vm.state) == before


def test_bad_specs_refused_and_nothing_written(hello_vm: Booted) -> None:
    before = vm_files(hello_vm.state)
    for bad, field in ((dict(memory_mb=0), "memory_mb"), (dict(memory_mb=None), "memory_mb"),
                       (dict(component="Bad,Name"), "component"),
                       (dict(component="-x"), "component"), (dict(service="a/b"), "service"),
                       (dict(vcpus=0), "vcpus"), (dict(image_sha256="abc"), "image_sha256")):
        with pytest.raises(ValidationError) as err:
            hello_vm.rt.run(replace(hello_vm.spec, **bad))
        assert err.value.field == field
    assert vm_files(hello_vm.state) == before


def test_digest_pin_mismatch_refused_before_boot(hello_vm: Booted) -> None:
    pid = hello_vm.pid()
    before = vm_files(hello_vm.state)
    meta = (hello_vm.dir / "meta.json").read_bytes()
    with pytest.raises(ImageError, match="digest mismatch"):
        hello_vm.rt.run(replace(hello_vm.spec, image_sha256="0" * 64))
    with pytest.raises(ImageError, match="digest mismatch"):
        hello_vm.rt.run(replace(hello_vm.spec, component="pinned", image_sha256="0" * 64))
    assert hello_vm.pid() == pid and not wait_gone(pid, 0.1)   # the old VM kept running
    assert (hello_vm.dir / "meta.json").read_bytes() == meta
    assert vm_files(hello_vm.state) == before                     # no build dirs left


def test_image_without_the_elf_refused(hello_vm: Booted, notelf_image: str) -> None:
    rt = hello_vm.rt
    missing = replace(hello_vm.spec, component="nobin", binary="/usr/local/bin/nope")
    with pytest.raises(ImageError, match="/usr/local/bin/nope not found in image"):
        rt.pull(missing)
    notelf = replace(hello_vm.spec, component="notelf", image=notelf_image)
    with pytest.raises(ImageError, match="not an ELF"):
        rt.run(notelf)
    with pytest.raises(ImageError):
        rt.pull(replace(hello_vm.spec, component="noimg",
                        image=f"localhost/mcp-none-{uuid.uuid4().hex[:6]}:v1"))
    left = podman_cli("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in left if n.startswith("mcp-extract-")]
    assert [w.component for w in rt.list()] == ["web-a"]


def test_sigkill_of_qemu_shows_stopped(hello_vm: Booted) -> None:
    pid = hello_vm.pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    w = hello_vm.rt.inspect(hello_vm.spec.service, "web-a")
    assert w is not None and w.state == STOPPED and w.extra["pid"] is None
    assert [x.state for x in hello_vm.rt.list()] == [STOPPED]
    assert hello_vm.rt.info()["vms_running"] == 0


def test_redeploy_with_matching_pin_on_a_new_port_appends_the_console(hello_vm: Booted) -> None:
    old = hello_vm.console()
    sha = hello_vm.rt.inspect(hello_vm.spec.service, "web-a").extra["image_sha256"]  # type: ignore[union-attr]
    port = free_port()
    spec = replace(hello_vm.spec, env=(f"PORT={port}", "MESSAGE=again"), ports=(port,),
                   image_sha256=sha)
    w = hello_vm.rt.run(spec)
    hello_vm.spec, old_port, hello_vm.port = spec, hello_vm.port, port
    assert w.state == RUNNING and w.extra["image_sha256"] == sha   # env is not in the image
    assert wait_http(port, timeout=120) == "hello from again\n"
    assert refused(old_port)
    console = hello_vm.console()
    assert console.startswith(old) and f"listening on :{port}" in console


def test_cooperative_stop_powers_off_cleanly(hello_vm: Booted) -> None:
    pid = hello_vm.pid()
    hello_vm.rt.stop(hello_vm.spec.service, "web-a", timeout=60)
    assert wait_gone(pid, 0.5)
    assert "power button, sending SIGTERM" in hello_vm.console()
    assert "program exited (0), powering off" in hello_vm.console()
    assert "SIGTERM, shutting down" in hello_vm.console()
    assert refused(hello_vm.port)
    w = hello_vm.rt.inspect(hello_vm.spec.service, "web-a")
    assert w is not None and w.state == STOPPED
    hello_vm.rt.stop(hello_vm.spec.service, "web-a")   # stopping a stopped VM: no-op


def test_remove_deletes_the_state_directory(hello_vm: Booted) -> None:
    hello_vm.rt.remove(hello_vm.spec.service, "web-a")
    assert not hello_vm.dir.exists()
    assert hello_vm.rt.inspect(hello_vm.spec.service, "web-a") is None
    assert hello_vm.rt.list() == []
    hello_vm.rt.remove(hello_vm.spec.service, "web-a")   # missing: no error


# -- the busybox VM: volumes, quoting, rotation, an uncooperative guest --------------------------

NASTY = "it's a (test) \"x\" $HOME `id` ; done"
SCRIPT = r"""
trap '' TERM
echo "guest-arg<$0>"
/bin/busybox cat /data/in.txt
printf '%s' "$MESSAGE" > /data/out.txt
(echo x > /ro/try) 2>/dev/null || echo "ro-refused"
/bin/busybox seq 1 400
/bin/busybox httpd -f -p "$PORT" -h /data &
while :; do /bin/busybox sleep 1; done
"""


@pytest.fixture(scope="module")
def bb_vm(tmp_path_factory: pytest.TempPathFactory, busybox_image: str) -> Iterator[Booted]:
    need_qemu()
    state = tmp_path_factory.mktemp("qemu-bb")
    data = tmp_path_factory.mktemp("vol-data")
    (data / "in.txt").write_text("from the host\n")
    ro = tmp_path_factory.mktemp("vol-ro")
    rt = qemu_runtime(qemu_config(state, console_max_bytes=1024))
    port = free_port()
    spec = WorkloadSpec(
        service=f"t{uuid.uuid4().hex[:8]}", component="bb", image=busybox_image,
        cmd=("sh", "-c", SCRIPT, "arg with (space)"), env=(f"PORT={port}", f"MESSAGE={NASTY}"),
        volumes=(f"{data}:/data", f"{ro}:/ro:ro"), ports=(port,), memory_mb=160)
    reaper = VMReaper()
    reaper.add(rt, spec.service, spec.component)
    try:
        rt.run(spec)     # run pulls when nothing was pulled yet
        wait_http(port, "/in.txt", timeout=120)
        yield Booted(rt, state, spec, port)
    finally:
        reaper.run()


def test_volumes_env_and_args_reach_the_guest(bb_vm: Booted) -> None:
    assert wait_http(bb_vm.port, "/in.txt") == "from the host\n"      # 9p read
    data = Path(bb_vm.spec.volumes[0].split(":")[0])
    assert (data / "out.txt").read_text() == NASTY                     # 9p write, exact env
    console = b"".join(bb_vm.rt.logs(bb_vm.spec.service, "bb")).decode(errors="replace")
    assert "guest-arg<arg with (space)>" in console
    assert "ro-refused" in console
    assert not list(Path(bb_vm.spec.volumes[1].split(":")[0]).iterdir())


def test_console_is_rotated_once_past_the_cap(bb_vm: Booted) -> None:
    bb_vm.rt.list()     # the monitor's listing rotates
    rotated = bb_vm.dir / "console.log.1"
    assert rotated.exists()
    assert (bb_vm.dir / "console.log").stat().st_size <= 1024
    text = b"".join(bb_vm.rt.logs(bb_vm.spec.service, "bb")).decode(errors="replace")
    assert "400\n" in text      # the rotated part is still served by logs


def test_guest_ignoring_the_power_button_is_killed_at_the_timeout(bb_vm: Booted) -> None:
    pid = bb_vm.pid()
    bb_vm.rt.stop(bb_vm.spec.service, "bb", timeout=3)
    assert wait_gone(pid, 0.5)
    text = b"".join(bb_vm.rt.logs(bb_vm.spec.service, "bb")).decode(errors="replace")
    assert "power button, sending SIGTERM" in text     # it got the button ...
    assert "program exited" not in text                # ... and ignored it
    assert refused(bb_vm.port)
    bb_vm.rt.remove(bb_vm.spec.service, "bb")
    assert vm_files(bb_vm.state) == []


def test_pull_asks_podman_nothing_while_the_image_store_is_unchanged(
        tmp_path: Path, hello_images: dict[str, str]) -> None:
    """A redeploy of an unchanged image costs no podman call (the store's image index is
    unchanged); a retag is seen at once, and the new image's id recorded."""
    rt = qemu_runtime(qemu_config(tmp_path))
    ref = f"localhost/mcp-pullcache-{uuid.uuid4().hex[:8]}:t"
    assert podman_cli("tag", hello_images["v1"], ref).returncode == 0
    calls: list[str] = []
    real = rt.podman.run

    def counting(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(args[0])
        return real(*args, **kw)  # type: ignore[arg-type]

    rt.podman.run = counting  # type: ignore[method-assign]
    spec = WorkloadSpec(service="p", component="c", image=ref, memory_mb=64)
    cache = tmp_path / "vm-cache" / f"{rt.elfs.key(spec.image, spec.binary, spec.component)}.json"

    def image_id(tag: str) -> str:
        return podman_cli("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()

    try:
        rt.pull(spec)
        assert "cp" in calls and json.loads(cache.read_text())["image_id"] == image_id(ref)
        for _ in range(5):   # other processes may change the store meanwhile: then asking is right
            calls.clear()
            before = rt.podman.store_stamp()
            rt.pull(replace(spec, cmd=("--flag",)))
            if rt.podman.store_stamp() == before:
                break
        assert before and calls == []
        assert json.loads(cache.read_text())["argv"] == ["--flag"]   # argv follows cmd
        assert podman_cli("tag", hello_images["v2"], ref).returncode == 0
        calls.clear()
        rt.pull(spec)
        assert "image" in calls
        assert json.loads(cache.read_text())["image_id"] == image_id(hello_images["v2"])
    finally:
        podman_cli("rmi", ref)
