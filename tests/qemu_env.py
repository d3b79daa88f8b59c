"""QEMU fixtures, shared by every area's tests (imported by conftest).

- ``kernel_path()``: the kernel the initramfs builder uses in tests (``$MCP_KERNEL``,
  else ``.build/kernel/vmlinuz`` from scripts/setup.sh); ``need_qemu()`` skips (or fails
  under MCP_REQUIRE_INTEGRATION=1) without qemu, podman, busybox-static or that kernel.
- ``nanos_dir()``: the Nanos build tests and benches use: ``$MCP_NANOS_DIR``, else
  ``<repo>/../shared/nanos`` (read-only; nothing is written beside it). ``need_nanos()``
  skips without it, saying why (fails under MCP_REQUIRE_INTEGRATION=1), and without qemu
  and podman.
- ``qemu_config(state_dir, **qemu)``: an ``AgentConfig`` for a runtime over ``state_dir``
  with that kernel, accel tcg (KVM does not run guests here; the probe has its own test).
  ``nanos_config(state_dir, machine, **qemu)``: the same with ``nanos_dir`` set (the nanos
  builder wins over initramfs). ``qemu_runtime(config)``: a ``QemuRuntime`` over it.
- ``nanos`` fixture: ``nanos_dir()`` after ``need_nanos()``; ``qemu_kernel``: the kernel
  after ``need_qemu()``; ``paused_qemu``: a qemu with no guest, CPUs stopped (``-S``),
  its QMP socket past sun_path's 108 bytes; stopped by pid at the end.
- ``VMReaper``: records every (runtime, service, component) a test boots and, at teardown,
  removes them through the runtime and SIGKILLs by pid any qemu still recorded in their
  state directories (only those).
- ``vm_reaper`` fixture: a function-scoped ``VMReaper``.
- ``busybox_image``: ``localhost/mcp-bb-<suffix>:v1`` (session; removed at the end), an image
  whose Entrypoint is a static busybox at /bin/busybox: a scriptable guest.
- ``notelf_image``: ``localhost/mcp-notelf-<suffix>:v1`` (session; removed at the end) with a
  text file at /usr/local/bin/hello as its Entrypoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcp_node.config import AgentConfig, from_dict

__all__ = ["kernel_path", "need_qemu", "qemu_config", "VMReaper", "vm_reaper",
           "busybox_image", "notelf_image", "qemu_pids_in", "wait_gone", "nanos_dir",
           "need_nanos", "nanos_config", "qemu_runtime", "TEST_OWNER", "nanos", "qemu_kernel",
           "paused_qemu"]

_TOP = Path(__file__).resolve().parent.parent


def kernel_path() -> Path:
    return Path(os.environ.get("MCP_KERNEL") or _TOP / ".build" / "kernel" / "vmlinuz")


def need_qemu() -> None:
    from conftest import need

    kernel = [] if kernel_path().is_file() else [f"a kernel at {kernel_path()}"]
    need("qemu-system-x86_64", "podman", "busybox", also=tuple(kernel))


def nanos_dir() -> Path:
    """``$MCP_NANOS_DIR``, else ``<repo>/../shared/nanos``."""
    return Path(os.environ.get("MCP_NANOS_DIR") or _TOP.parent / "shared" / "nanos")


def need_nanos() -> None:
    from conftest import need

    d = nanos_dir()
    missing = [f for f in ("kernel.img", "boot.img", "mkfs") if not (d / f).is_file()]
    also = (f"a Nanos build at {d} ({', '.join(missing)} missing; set MCP_NANOS_DIR)",
            ) if missing else ()
    need("qemu-system-x86_64", "podman", also=also)


def qemu_config(state_dir: Path, **qemu: Any) -> AgentConfig:
    from podman_env import containers_conf

    # A test's volumes are siblings of its state dir: their parent is the volume root.
    section = {"kernel": str(kernel_path()), "accel": "tcg", **qemu}
    return from_dict({"qemu": section, "state": {"dir": str(state_dir)},
                      "podman": {"containers_conf": containers_conf(),
                                 "volume_roots": [str(Path(state_dir).parent)]}})


def nanos_config(state_dir: Path, machine: str = "q35", **qemu: Any) -> AgentConfig:
    return qemu_config(state_dir, nanos_dir=str(nanos_dir()), machine=machine, **qemu)


TEST_OWNER = "test-node"


@pytest.fixture
def nanos() -> Path:
    need_nanos()
    return nanos_dir()


@pytest.fixture
def qemu_kernel() -> Path:
    need_qemu()
    return kernel_path()


@pytest.fixture
def paused_qemu(tmp_path: Path) -> Iterator[Path]:
    from conftest import need

    need("qemu-system-x86_64")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    pidfile = deep / "qemu.pid"
    subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "32",
                    "-nodefaults", "-no-user-config", "-display", "none", "-S",
                    "-daemonize", "-pidfile", str(pidfile),
                    "-qmp", "unix:qmp.sock,server=on,wait=off"],
                   cwd=deep, check=True, capture_output=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        yield deep / "qmp.sock"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def qemu_runtime(config: AgentConfig, owner: str = TEST_OWNER) -> Any:
    from mcp_node.qemu import QemuRuntime

    return QemuRuntime(config, config.state_dir, owner)


def qemu_pids_in(state_dir: Path) -> list[int]:
    """Live qemu processes whose pidfile is in ``state_dir``/vms (checked via cmdline):
    a VM dir's own ``qemu.pid`` or a launch's under ``vms/.pids`` (``VMMeta.pidfile``)."""
    out = []
    vms = state_dir / "vms"
    for pidfile in [*vms.glob("*/qemu.pid"), *vms.glob(".pids/*.pid")]:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(pidfile).encode() in argv:
                out.append(pid)
    return out


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


class VMReaper:
    def __init__(self) -> None:
        self.vms: list[tuple[Any, str, str]] = []
        self.state_dirs: list[Path] = []

    def add(self, runtime: Any, service: str, component: str) -> None:
        self.vms.append((runtime, service, component))
        self.state_dirs.append(Path(runtime.state_dir))

    def watch(self, state_dir: Path) -> None:
        self.state_dirs.append(state_dir)

    def run(self) -> None:
        for rt, service, component in reversed(self.vms):
            with contextlib.suppress(Exception):
                rt.remove(service, component)
        for d in self.state_dirs:
            for pid in qemu_pids_in(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)


@pytest.fixture
def vm_reaper() -> Iterator[VMReaper]:
    reaper = VMReaper()
    try:
        yield reaper
    finally:
        reaper.run()


def _import_image(ref: str, files: dict[str, tuple[bytes, int]], entrypoint: str) -> None:
    from podman_env import containers_conf, podman_cli

    with tempfile.TemporaryDirectory() as root:
        for rel, (data, mode) in files.items():
            p = Path(root) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode)
        tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True)
        proc = subprocess.run(
            ["podman", "import", "--change", f'ENTRYPOINT ["{entrypoint}"]', "-", ref],
            input=tar.stdout, capture_output=True, timeout=120,
            env={**os.environ, "CONTAINERS_CONF": containers_conf()})
        if proc.returncode != 0:
            pytest.fail(f"podman import {ref}: {proc.stderr.decode()[-1000:]}")
    assert podman_cli("image", "exists", ref).returncode == 0


@pytest.fixture(scope="session")
def busybox_image() -> Iterator[str]:
    from conftest import need
    from podman_env import podman_cli

    need("podman", "busybox")
    ref = f"localhost/mcp-bb-{uuid.uuid4().hex[:8]}:v1"
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    _import_image(ref, {"bin/busybox": (busybox, 0o755), "tmp/.keep": (b"", 0o644)},
                  "/bin/busybox")
    try:
        yield ref
    finally:
        podman_cli("rmi", "-f", ref)


@pytest.fixture(scope="session")
def notelf_image() -> Iterator[str]:
    from podman_env import podman_cli

    need_qemu()
    ref = f"localhost/mcp-notelf-{uuid.uuid4().hex[:8]}:v1"
    _import_image(ref, {"usr/local/bin/hello": (b"#!/bin/sh\necho not an ELF\n", 0o755)},
                  "/usr/local/bin/hello")
    try:
        yield ref
    finally:
        podman_cli("rmi", "-f", ref)
