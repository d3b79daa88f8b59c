"""A VM's on-disk state: its directory, its metadata as a typed record, its liveness,
its console log; and the host resources VMs are admitted against.

``<state_dir>/vms/<service>-<component>/`` holds ``meta.json`` (``VMMeta``),
``qemu.pid``, ``qmp.sock``, ``console.log`` (+ ``.1``) and ``image/``. A restarted agent
re-adopts a running VM from these files alone.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import qmp
from .errors import ResourceError
from .files import atomic_write, host_memory_mb, read_cmdline
from .logtail import LogTail
from .runtime import workload_name
from .vmimage import BootPlan

log = logging.getLogger(__name__)

MICROVM_GRACE_S = 0.1     # microvm: time the program gets for its SIGTERM handler (it's
# delivered ~0.02 s after the power button under TCG here)


def stop_text(machine: str, timeout: float) -> str:
    """What a guest gets on stop, as status and health show it. The power button is ACPI
    ``system_powerdown``: the program gets SIGTERM (Nanos; the initramfs init sends it),
    and on q35 the guest then powers itself off. A Nanos guest on microvm cannot, so it
    is not waited for."""
    if machine == "microvm":
        return (f"power button, quit after {MICROVM_GRACE_S:g}s "
                "(microvm: the guest cannot power off)")
    return f"power button, quit after {timeout:g}s"


@dataclass(frozen=True)
class VMDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def pidfile(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def image(self) -> Path:
        return self.path / "image"


@dataclass(frozen=True)
class VMMeta:
    """What the runtime records about a VM when it launches it (``meta.json``)."""

    service: str
    component: str
    image: str                      # the OCI image reference
    binary: str                     # the ELF's path inside that image
    builder: str
    image_sha256: str
    memory_mb: int
    vcpus: int
    machine: str                    # q35 | microvm
    accel: str                      # kvm | tcg
    ports: tuple[int, ...]
    mac: str
    stop_timeout_s: float
    boot: BootPlan
    started_at: float
    owner: str = ""                 # node id of the agent that launched it
    spec_digest: str = ""           # WorkloadSpec.digest it was made from
    # qemu's pidfile ("": the dir's qemu.pid). Outside the dir, one per launch: a
    # start-first replace renames the dirs of running VMs (``QemuRuntime.promote``), and
    # qemu unlinks the pidfile path it was given when it exits.
    pidfile: str = ""
    tap: str = ""                   # bridge mode (issue 23): the TAP qemu opens...
    address: str = ""               # ...and the guest's address on its service network
    extra: dict[str, Any] = field(default_factory=dict)   # keys of newer versions, kept

    @property
    def name(self) -> str:
        return workload_name(self.service, self.component)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["ports"] = list(self.ports)
        d["boot"] = self.boot.to_dict()
        d.update(d.pop("extra"))
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMMeta:
        """KeyError/TypeError/ValueError on a record that is not one."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            service=str(d["service"]), component=str(d["component"]),
            image=str(d.get("image", "")), binary=str(d.get("binary", "")),
            builder=str(d.get("builder", "")), image_sha256=str(d.get("image_sha256", "")),
            memory_mb=int(d["memory_mb"]), vcpus=int(d.get("vcpus", 1)),
            machine=str(d["machine"]), accel=str(d["accel"]),
            ports=tuple(int(p) for p in d.get("ports", ())), mac=str(d["mac"]),
            stop_timeout_s=float(d.get("stop_timeout_s", 10.0)),
            boot=BootPlan.from_dict(d["boot"]), started_at=float(d.get("started_at", 0.0)),
            owner=str(d.get("owner", "")), spec_digest=str(d.get("spec_digest", "")),
            pidfile=str(d.get("pidfile", "")), tap=str(d.get("tap", "")),
            address=str(d.get("address", "")),
            extra={k: v for k, v in d.items() if k not in known})


def write_meta(d: VMDir, meta: VMMeta) -> None:
    atomic_write(d.meta, meta.to_json())


def read_meta(d: VMDir) -> VMMeta | None:
    """The VM's record, or None if there is none or it is unreadable."""
    try:
        raw = json.loads(d.meta.read_bytes())
        return VMMeta.from_dict(raw) if isinstance(raw, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("qemu: unreadable %s: %s", d.meta, exc)
        return None


def pidfile_of(d: VMDir, meta: VMMeta) -> Path:
    return Path(meta.pidfile) if meta.pidfile else d.pidfile


def new_pidfile(d: VMDir) -> Path:
    """A launch's own pidfile beside the VM dirs (``VMMeta.pidfile``)."""
    pids = d.path.parent / ".pids"
    pids.mkdir(mode=0o700, exist_ok=True)
    return pids / f"{d.name}.{os.urandom(4).hex()}.pid"


def live_pid(d: VMDir, meta: VMMeta) -> int | None:
    """The qemu pid if that process is alive and is this VM's qemu (not a reused pid)."""
    pidfile = pidfile_of(d, meta)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = read_cmdline(pid)
    if argv and "-pidfile" in argv and argv[argv.index("-pidfile") + 1:][:1] == [
            str(pidfile)] and f"guest={meta.name}" in argv:
        return pid
    return None


class GuestRuns:
    """Which qemu processes are known to run their guest: let run by this agent, or seen
    running once. A VM adopted after a crash (left in ``prelaunch`` by an agent killed
    before its ``cont``) is asked QMP once, not in every listing; once seen running, only
    QMP (the agent's) stops its guest."""

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}   # VM dir name -> qemu pid
        self._launching: set[str] = set()  # VM dir names this agent is launching now

    def status(self, d: VMDir, pid: int, fresh: bool = False) -> str:
        """The run state of live qemu ``pid`` ("running", "prelaunch", "paused" ...) or
        "unreachable: why"; QMP is asked unless it is known to run or is being launched
        (always if ``fresh``)."""
        if not fresh and (self._pids.get(d.name) == pid or d.name in self._launching):
            return "running"
        status = qmp.run_state(d.qmp)
        if status == "running":
            self._pids[d.name] = pid
        else:
            self._pids.pop(d.name, None)
        return status

    @contextmanager
    def launching(self, d: VMDir) -> Iterator[None]:
        self._launching.add(d.name)
        try:
            yield
        finally:
            self._launching.discard(d.name)

    def runs(self, d: VMDir, pid: int) -> None:
        self._pids[d.name] = pid

    def forget(self, d: VMDir) -> None:
        self._pids.pop(d.name, None)


def check_room(name: str, mem: int, vcpus: int, used: int, running: int,
               reserve_mb: int, reserve_vcpus: int) -> None:
    """Refuse a VM that would overcommit host memory (less the reserve) or the host's
    CPUs (less theirs); ``used`` MiB are held by ``running`` VMs."""
    total = host_memory_mb()
    if used + mem + reserve_mb > total:
        raise ResourceError(
            f"not enough memory for {name}: requested {mem} MiB + {used} MiB in {running} "
            f"running VMs + {reserve_mb} MiB reserve > {total} MiB on this host")
    if vcpus > host_cpus() - reserve_vcpus:
        raise ResourceError(f"{name}: {vcpus} vCPUs requested, this host has "
                            f"{host_cpus()} CPUs ({reserve_vcpus} reserved)")


def host_cpus() -> int:
    return os.cpu_count() or 1


def console_rotate(path: Path, max_bytes: int) -> bool:
    """Copy-truncate rotation to ``<path>.1`` once the log passes ``max_bytes``.

    qemu holds the file open with O_APPEND, so truncating in place is safe:
    its next write lands at the new end. Never truncated otherwise. Serialised:
    the monitor's listing and an API inspect may rotate at once, and a second
    copy-truncate would drop what qemu wrote in between (or trip on the temp file).
    """
    with _rotate_lock:
        try:
            if path.stat().st_size <= max_bytes:
                return False
        except FileNotFoundError:
            return False
        rotated = path.with_name(path.name + ".1")
        tmp = path.with_name(path.name + ".1.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, rotated)
        with path.open("r+b") as f:
            f.truncate(0)
    log.info("console %s rotated at %d bytes", path, max_bytes)
    return True


_rotate_lock = threading.Lock()


# -- processes and the console -------------------------------------------------------------------

def wait_exit(pid: int, timeout: float, still_ours: Callable[[], bool]) -> bool:
    """True once ``pid`` has ended (a zombie counts: PID 1 reaps it late), within
    ``timeout``. A pidfd wakes us at the exit itself; ``still_ours()`` is checked after
    opening it, so a reused pid is never waited on."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:            # no pidfd (old kernel): poll
        fd = -1
    try:
        if not still_ours():
            return True
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if fd >= 0:
                poller = select.poll()   # not select(): an fd may be above 1023
                poller.register(fd, select.POLLIN)
                if poller.poll(max(left, 0) * 1000):
                    return True
            elif not still_ours():
                return True
            else:
                time.sleep(min(0.02, max(left, 0)))
            if not still_ours():
                return True
            if time.monotonic() >= deadline:
                return False
    finally:
        if fd >= 0:
            os.close(fd)


def read_console(d: VMDir, tail: int | None, follow: bool, alive: Callable[[], bool],
                 max_bytes: int | None = None,
                 stamp_from: float | None = None) -> Iterator[bytes]:
    """The serial console (the rotated part first), LF line ends, at most ``tail`` lines
    and ``max_bytes`` bytes of it, found from the end (``logtail``); with ``follow``,
    what is written next, until ``alive()`` says the VM is gone. ``stamp_from``: each
    line stamped (``logtime.Stamped``: the console records no times), earlier ones
    with this start of the run."""
    path = d.console
    out = LogTail([path.with_name(path.name + ".1"), path], "plain", tail, max_bytes,
                  follow, alive)
    if stamp_from is None:
        return out
    from .logtime import Stamped

    return Stamped(out, lambda: out.in_snapshot, stamp_from)
