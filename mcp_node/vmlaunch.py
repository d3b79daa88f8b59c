"""Starting and stopping one VM's qemu process: the mechanics under ``QemuRuntime``,
which holds the locks, the capacity checks and the state on disk. A launch runs
qemu daemonised in the VM directory, the guest's CPUs held (``-S``) while an image
not hashed yet is hashed, so the digest is of the image as built and costs no time
before boot; volume host paths are checked before and again once qemu has opened
them. A stop presses the ACPI power button (again each second: a guest still
booting misses it), then QMP ``quit``, then SIGKILL, each bounded; a guest that
cannot power itself off (microvm) gets only ``MICROVM_GRACE_S`` for its program's
SIGTERM handler. Logged as ``mcp_node.qemu``, like the runtime."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from . import qmp
from .errors import HostPathError, WorkloadError
from .grammar import resolve_volumes
from .mounts import moved_source
from .qemuargs import VMParams, qemu_argv
from .vmimage import hash_into
from .vmstate import (
    MICROVM_GRACE_S,
    VMDir,
    VMMeta,
    console_rotate,
    live_pid,
    new_pidfile,
    pidfile_of,
    wait_exit,
    write_meta,
)

log = logging.getLogger("mcp_node.qemu")

QUIT_WAIT_S = 3.0
POWER_BUTTON_REPEAT_S = 1.0
KILL_WAIT_S = 5.0


def vm_params(binary: str, d: VMDir, meta: VMMeta, paused: bool = False) -> VMParams:
    return VMParams(
        binary=binary, name=meta.name, machine=meta.machine, accel=meta.accel,
        memory_mb=meta.memory_mb, vcpus=meta.vcpus, pidfile=str(pidfile_of(d, meta)),
        qmp=d.qmp.name, console=str(d.console), ports=meta.ports, mac=meta.mac, plan=meta.boot,
        paused=paused, tap=meta.tap)


def launch(d: VMDir, meta: VMMeta, binary: str, volume_roots: Sequence[str],
           console_max_bytes: int) -> tuple[VMMeta, int]:
    """qemu started for ``meta``; the meta (with the image digest) and qemu's pid once
    the guest runs. A failure leaves no qemu of this launch running."""
    console_rotate(d.console, console_max_bytes)
    for stale in (d.qmp, pidfile_of(d, meta)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    meta = replace(meta, pidfile=str(new_pidfile(d)))
    write_meta(d, meta)   # before qemu starts: a crash right after still finds its pid
    paused = not meta.image_sha256
    # Host paths resolved and checked at every boot; qemu gets the resolved ones.
    boot = replace(meta.boot, volumes=resolve_volumes(meta.boot.volumes, volume_roots))
    argv = qemu_argv(vm_params(binary, d, replace(meta, boot=boot), paused))
    digest: list[str | BaseException] = []
    hasher = threading.Thread(target=hash_into, args=(Path(meta.boot.image), digest),
                              name=f"hash-{d.name}", daemon=True)
    if paused:
        hasher.start()
    log.info("run (cwd %s): %s", d.path, " ".join(argv))
    try:
        proc = subprocess.run(argv, cwd=d.path, capture_output=True, timeout=60,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkloadError(f"qemu failed to start for {d.name}: {exc}") from exc
    finally:
        if paused:
            hasher.join()
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise WorkloadError(
            f"qemu failed to start for {d.name} (exit {proc.returncode}): {err}")
    pid = live_pid(d, meta)
    if pid is None:
        raise WorkloadError(f"qemu for {d.name} exited right after starting; "
                            f"see {d.console}")
    # qemu has opened its 9p shares by the time it daemonised: one swapped after the
    # check above was followed, so the VM goes at once (detected, not prevented).
    moved = moved_source((v.host for v in boot.volumes), volume_roots)
    if moved:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise HostPathError(f"volume host path {moved} changed while {d.name} started "
                            "(a directory on it was swapped); killed it", "volumes")
    if paused:
        try:
            if isinstance(digest[0], BaseException):
                raise WorkloadError(f"cannot hash the image of {d.name}: {digest[0]}")
            meta = replace(meta, image_sha256=digest[0],
                           boot=replace(meta.boot, sha256=digest[0]))
            qmp.execute(d.qmp, "cont")   # the digest is known: the guest may run
            write_meta(d, meta)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise
    return meta, pid


def stop(d: VMDir, meta: VMMeta, pid: int, timeout: float, status: str) -> None:
    """Power button, then (bounded) wait, QMP quit, SIGKILL; ``status`` is the guest's
    QMP status as last known (CPUs that do not run never see the power button)."""
    def ours() -> bool:
        return live_pid(d, meta) == pid

    wait = timeout if meta.machine != "microvm" else min(timeout, MICROVM_GRACE_S)
    if qmp.stopped(status):
        wait = 0.0   # CPUs that do not run (prelaunch, paused ...) never see it
    log.info("qemu %s: power button, waiting up to %.1fs", d.name, wait)
    deadline = time.monotonic() + wait
    while True:   # pressed again each second: a guest still booting missed it
        try:
            qmp.execute(d.qmp, "system_powerdown")
        except qmp.QMPError as exc:
            log.warning("qemu %s: %s", d.name, exc)
        left = deadline - time.monotonic()
        if wait_exit(pid, min(max(left, 0), POWER_BUTTON_REPEAT_S), ours):
            return
        if left <= POWER_BUTTON_REPEAT_S:
            break
    if meta.machine != "microvm":
        log.warning("qemu %s: guest ignored the power button for %.1fs; quitting",
                    d.name, wait)
    try:
        qmp.execute(d.qmp, "quit")
    except qmp.QMPError as exc:
        log.warning("qemu %s: %s", d.name, exc)
    if wait_exit(pid, QUIT_WAIT_S, ours):
        return
    kill(d, meta, pid)


def kill(d: VMDir, meta: VMMeta, pid: int) -> None:
    log.warning("qemu %s: SIGKILL pid %d", d.name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_exit(pid, KILL_WAIT_S, lambda: live_pid(d, meta) == pid):
        raise WorkloadError(f"qemu pid {pid} of {d.name} survived SIGKILL")
