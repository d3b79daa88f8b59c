"""The unikernel runtime: each component a QEMU VM (design §4).

State lives on disk only, in ``<state_dir>/vms/<service>-<component>/``
(``meta.json``, ``qemu.pid``, ``qmp.sock``, ``console.log``, ``image/``), so a
restarted agent re-adopts running VMs by reading it and never has to kill
anything on start. qemu runs daemonised; liveness is "pid alive *and*
/proc/<pid>/cmdline is this VM's qemu", which guards against pid reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import qmp
from .config import AgentConfig
from .errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    ResourceError,
    RuntimeError_,
    RuntimeUnavailable,
    ValidationError,
)
from .files import atomic_write, read_cmdline
from .initramfs import find_busybox, find_kernel
from .qemuargs import (
    VMParams,
    console_rotate,
    host_cpus,
    host_memory_mb,
    mac_for,
    probe_kvm,
    qemu_argv,
)
from .runtime import RUNNING, STOPPED, Workload, WorkloadSpec, workload_name
from .servicedef import SHA256_RE, check_name
from .vmimage import BootPlan, BuildRequest, choose_builder, parse_volumes
from .vmpull import Podman, PulledELF, extract_elf

log = logging.getLogger(__name__)

META = "meta.json"
PIDFILE = "qemu.pid"
QMP_SOCK = "qmp.sock"
CACHE_GRACE_S = 600.0
CONSOLE = "console.log"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lf(data: bytes) -> bytes:
    """The serial line is a tty (CRLF); logs read like a container's (LF)."""
    return data.replace(b"\r\n", b"\n")


class QemuRuntime:
    name = "unikernel"

    def __init__(self, config: AgentConfig, state_dir: Path | None = None) -> None:
        self.config = config
        self.cfg = config.qemu
        # Absolute: qemu runs with its cwd in the VM directory, so a relative pidfile or
        # console path (``--state-dir ./st``) would resolve below it.
        self.state_dir = (Path(state_dir) if state_dir else config.state_dir).absolute()
        self.vms_dir = self.state_dir / "vms"
        self.cache_dir = self.state_dir / "vm-cache"
        self.podman = Podman(containers_conf=config.podman.containers_conf)
        self._accel: str | None = None
        self._avail: tuple[bool, str] | None = None
        self._builder_name = ""
        self._lock = threading.RLock()            # capacity check + launch, dir claims
        self._guard = threading.Lock()            # _vm_locks and the accel probe
        self._vm_locks: dict[str, threading.RLock] = {}

    # -- enablement ----------------------------------------------------------------------------

    def _qemu_binary(self) -> str | None:
        b = self.cfg.binary
        if "/" in b:
            return b if os.access(b, os.X_OK) else None
        return shutil.which(b)

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, every missing piece). Rechecked until it succeeds."""
        if self._avail and self._avail[0]:
            return self._avail
        missing = []
        if not self._qemu_binary():
            missing.append(f"qemu binary ({self.cfg.binary!r} not found)")
        choice = choose_builder(self.cfg)
        self._builder_name = choice.builder.name if choice.builder else ""
        if choice.builder is None:
            missing.append("an image builder: " + "; ".join(choice.missing))
        if not shutil.which(self.podman.binary):
            missing.append("podman (to extract the ELF from the image)")
        self._avail = (not missing, "; ".join(missing))
        return self._avail

    @property
    def builder_name(self) -> str:
        self.available()
        return self._builder_name

    @property
    def accel(self) -> str:
        """kvm only if configured or a probe boot under KVM printed; cached."""
        with self._guard:
            if self._accel is None:
                if self.cfg.accel != "auto":
                    self._accel = self.cfg.accel
                else:
                    ok, why = self._probe_cached()
                    self._accel = "kvm" if ok else "tcg"
                    if not ok:
                        log.warning("qemu: KVM is not usable (%s); VMs run under TCG, slowly", why)
            return self._accel

    def _probe_cached(self) -> tuple[bool, str]:
        """The KVM probe (up to ~20 s where KVM is broken), cached on disk per qemu binary,
        kernel and host kernel release, for a day."""
        binary = self._qemu_binary() or self.cfg.binary
        kernel, _ = find_kernel(self.cfg)

        def stamp(p: str | Path | None) -> str:
            try:
                st = os.stat(p) if p else None
            except OSError:
                st = None
            return f"{p}:{st.st_mtime_ns}:{st.st_size}" if st else f"{p}:-"

        key = "|".join((stamp(binary), stamp(kernel), os.uname().release))
        cache = self.vms_dir / ".accel-probe.json"
        cached = _read_json(cache)
        if cached and cached.get("key") == key and time.time() - cached.get("at", 0) < 86400:
            return bool(cached["ok"]), str(cached.get("why", ""))
        ok, why = probe_kvm(binary, kernel=kernel, busybox=find_busybox())
        with contextlib.suppress(OSError):
            self.vms_dir.mkdir(parents=True, exist_ok=True)
            _write_json(cache, {"key": key, "ok": ok, "why": why, "at": time.time()})
        return ok, why

    def _require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise RuntimeUnavailable(f"unikernel runtime unavailable on this node: missing {why}")

    # -- paths and names -----------------------------------------------------------------------

    def _dir(self, service: str, component: str) -> Path:
        check_name(service, "service")
        check_name(component, "component")
        return self.vms_dir / f"{service}-{component}"

    def _vm_lock(self, d: Path) -> threading.RLock:
        with self._guard:
            return self._vm_locks.setdefault(d.name, threading.RLock())

    def _meta(self, service: str, component: str) -> tuple[Path, dict[str, Any] | None]:
        """The VM's dir and meta; a dir owned by another (service, component) is a conflict."""
        d = self._dir(service, component)
        meta = _read_json(d / META)
        if meta and (meta.get("service"), meta.get("component")) != (service, component):
            raise ConflictError(
                f"VM state directory {d.name} belongs to service {meta.get('service')!r} "
                f"component {meta.get('component')!r}; {service}/{component} maps to the same name")
        return d, meta

    def _pid(self, d: Path, meta: dict[str, Any]) -> int | None:
        """The qemu pid if that process is alive and is this VM's qemu."""
        try:
            pid = int((d / PIDFILE).read_text().strip())
        except (OSError, ValueError):
            return None
        argv = read_cmdline(pid)
        name = workload_name(meta["service"], meta["component"])
        if argv and "-pidfile" in argv and argv[argv.index("-pidfile") + 1:][:1] == [
                str(d / PIDFILE)] and f"guest={name}" in argv:
            return pid
        return None

    # -- resources -----------------------------------------------------------------------------

    def _usage(self, exclude: str = "") -> tuple[int, int, int]:
        mem = cpus = n = 0
        for d, meta in self._scan():
            if d.name != exclude and self._pid(d, meta):
                mem += int(meta.get("memory_mb", 0))
                cpus += int(meta.get("vcpus", 1))
                n += 1
        return mem, cpus, n

    def check_capacity(self, spec: WorkloadSpec, replacing: bool) -> None:
        """Refuse a VM that would overcommit host memory (minus the reserve) or CPUs."""
        self._check_spec(spec)
        mem = int(spec.memory_mb or 0)
        d = self._dir(spec.service, spec.component)
        used, _cpus, n = self._usage(exclude=d.name if replacing else "")
        total, reserve = host_memory_mb(), self.cfg.reserve_memory_mb
        if used + mem + reserve > total:
            raise ResourceError(
                f"not enough memory for {spec.name}: requested {mem} MiB + {used} MiB in {n} "
                f"running VMs + {reserve} MiB reserve > {total} MiB on this host")
        cpus = host_cpus() - self.cfg.reserve_vcpus
        if spec.vcpus > cpus:
            raise ResourceError(f"{spec.name}: {spec.vcpus} vCPUs requested, this host has "
                                f"{host_cpus()} CPUs ({self.cfg.reserve_vcpus} reserved)")

    def _check_spec(self, spec: WorkloadSpec) -> None:
        check_name(spec.service, "service")
        check_name(spec.component, "component")
        if spec.memory_mb is None or spec.memory_mb <= 0:
            raise ValidationError("must be > 0 for a unikernel component", "memory_mb")
        if spec.vcpus < 1:
            raise ValidationError("must be >= 1", "vcpus")
        if spec.image_sha256 and not SHA256_RE.fullmatch(spec.image_sha256):
            raise ValidationError("must be 64 lowercase hex digits", "image_sha256")

    # -- pull ----------------------------------------------------------------------------------

    def _cache_key(self, spec: WorkloadSpec) -> str:
        return hashlib.sha256(f"{spec.image}\0{spec.binary}\0{spec.component}".encode()
                              ).hexdigest()[:24]

    def pull(self, spec: WorkloadSpec) -> None:
        """Get the image and extract the ELF into the cache; ImageError if it is not there."""
        check_name(spec.service, "service")
        check_name(spec.component, "component")
        if not shutil.which(self.podman.binary):
            raise RuntimeUnavailable("unikernel runtime needs podman to extract the ELF")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = self._cache_key(spec)
        elf = self.cache_dir / f"{key}.elf"
        cached = None
        with contextlib.suppress(TypeError, ValueError):
            old = _read_json(self.cache_dir / f"{key}.json")
            if old:
                cached = PulledELF(**{**old, "argv": tuple(old.get("argv", ()))})
        pulled = extract_elf(self.podman, spec.image, spec.binary, spec.component, spec.cmd, elf,
                             cached)
        os.utime(elf)  # podman cp keeps the image's mtime; the cache prunes by last use
        _write_json(self.cache_dir / f"{key}.json", asdict(pulled))

    # -- run -----------------------------------------------------------------------------------

    def run(self, spec: WorkloadSpec) -> Workload:
        """Build the image, verify a pin, then replace any running VM and boot the new one."""
        self._check_spec(spec)
        for p in spec.ports:
            if not 1 <= p <= 65535:
                raise ValidationError(f"port {p} out of range", "ports")
        self._require()
        d, _meta = self._meta(spec.service, spec.component)
        volumes = parse_volumes(spec.volumes)
        with self._vm_lock(d):
            key = self._cache_key(spec)
            pulled = _read_json(self.cache_dir / f"{key}.json")
            if pulled is None or not (self.cache_dir / f"{key}.elf").is_file():
                self.pull(spec)
                pulled = _read_json(self.cache_dir / f"{key}.json") or {}
            choice = choose_builder(self.cfg)
            if choice.builder is None:
                raise RuntimeUnavailable("no image builder: " + "; ".join(choice.missing))
            self.vms_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.vms_dir, prefix=f".build-{d.name}-"))
            created = False
            try:
                req = BuildRequest(
                    service=spec.service, component=spec.component,
                    elf=self.cache_dir / f"{key}.elf",
                    guest_path=str(pulled.get("binary") or f"/usr/local/bin/{spec.component}"),
                    argv=tuple(pulled.get("argv", ())),
                    env=spec.env, volumes=volumes, memory_mb=int(spec.memory_mb or 0),
                    vcpus=spec.vcpus, ports=spec.ports, cache_dir=self.cache_dir)
                plan = choice.builder.build(req, tmp)
                if spec.image_sha256 and plan.sha256 != spec.image_sha256:
                    raise ImageError(
                        f"image digest mismatch for {spec.name}: built {plan.sha256}, "
                        f"image_sha256 pins {spec.image_sha256}; not booting it")
                accel = self.accel
                self.check_capacity(spec, replacing=True)   # refuse before touching the old VM
                self.stop(spec.service, spec.component, spec.stop_timeout_s)
                with self._lock:
                    d, _meta = self._meta(spec.service, spec.component)  # re-check the claim
                    self.check_capacity(spec, replacing=True)
                    created = not d.exists()
                    d.mkdir(exist_ok=True)
                    old = d / "image.old"
                    shutil.rmtree(old, ignore_errors=True)
                    if (d / "image").exists():
                        os.replace(d / "image", old)
                    os.replace(tmp, d / "image")
                    shutil.rmtree(old, ignore_errors=True)
                    plan = plan.relocated(tmp, d / "image")
                    meta = {
                        "service": spec.service, "component": spec.component,
                        "image": spec.image, "binary": pulled.get("binary", spec.binary),
                        "builder": plan.builder, "image_sha256": plan.sha256,
                        "memory_mb": int(spec.memory_mb or 0), "vcpus": spec.vcpus,
                        "machine": self.cfg.machine, "accel": accel, "ports": list(spec.ports),
                        "mac": mac_for(spec.service, spec.component),
                        "stop_timeout_s": spec.stop_timeout_s, "boot": plan.to_dict(),
                        "started_at": time.time(),
                    }
                    _write_json(d / META, meta)
                    self._launch(d, meta, plan)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if created:
                    shutil.rmtree(d, ignore_errors=True)
                raise
        w = self.inspect(spec.service, spec.component)
        if w is None:
            raise RuntimeError_(f"{spec.name}: VM vanished right after start")
        return w

    def params(self, d: Path, meta: dict[str, Any], plan: BootPlan) -> VMParams:
        return VMParams(
            binary=self._qemu_binary() or self.cfg.binary,
            name=workload_name(meta["service"], meta["component"]),
            machine=meta["machine"], accel=meta["accel"], memory_mb=meta["memory_mb"],
            vcpus=meta["vcpus"], pidfile=str(d / PIDFILE), qmp=QMP_SOCK,
            console=str(d / CONSOLE), ports=tuple(meta["ports"]), mac=meta["mac"], plan=plan)

    def _launch(self, d: Path, meta: dict[str, Any], plan: BootPlan) -> None:
        console_rotate(d / CONSOLE, self.cfg.console_max_bytes)
        with contextlib.suppress(FileNotFoundError):
            (d / QMP_SOCK).unlink()
        with contextlib.suppress(FileNotFoundError):
            (d / PIDFILE).unlink()
        argv = qemu_argv(self.params(d, meta, plan))
        log.info("run (cwd %s): %s", d, " ".join(argv))
        try:
            proc = subprocess.run(argv, cwd=d, capture_output=True, timeout=60, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError_(f"qemu failed to start for {d.name}: {exc}") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-800:]
            raise RuntimeError_(
                f"qemu failed to start for {d.name} (exit {proc.returncode}): {err}")
        if self._pid(d, meta) is None:
            raise RuntimeError_(f"qemu for {d.name} exited right after starting; see {d / CONSOLE}")

    # -- stop / remove -------------------------------------------------------------------------

    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        """Power button, bounded wait, QMP quit, SIGKILL. Stopped or missing: no-op."""
        d, meta = self._meta(service, component)
        if meta is None:
            return
        with self._vm_lock(d):
            pid = self._pid(d, meta)
            if pid is None:
                return
            sock = d / QMP_SOCK
            try:
                qmp.execute(sock, "system_powerdown")
                log.info("qemu %s: system_powerdown sent, waiting up to %.1fs", d.name, timeout)
            except qmp.QMPError as exc:
                log.warning("qemu %s: %s", d.name, exc)
            if self._wait_gone(d, meta, timeout):
                return
            log.warning("qemu %s: guest ignored the power button for %.1fs; quitting",
                        d.name, timeout)
            try:
                qmp.execute(sock, "quit")
            except qmp.QMPError as exc:
                log.warning("qemu %s: %s", d.name, exc)
            if self._wait_gone(d, meta, 3.0):
                return
            log.warning("qemu %s: SIGKILL pid %d", d.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(d, meta, 5.0):
                raise RuntimeError_(f"qemu pid {pid} of {d.name} survived SIGKILL")

    def _wait_gone(self, d: Path, meta: dict[str, Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._pid(d, meta) is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def remove(self, service: str, component: str) -> None:
        d, meta = self._meta(service, component)
        if meta is None and not d.exists():
            return
        with self._vm_lock(d):
            if meta is not None:
                self.stop(service, component, float(meta.get("stop_timeout_s", 10.0)))
            shutil.rmtree(d)
        self._prune_cache()

    def _prune_cache(self) -> None:
        """Drop extracted ELFs once no VM is left (they are cheap to extract again).

        Only entries untouched for CACHE_GRACE_S go: a deploy of another service
        between its pull and its run must not lose the ELF it just extracted.
        """
        if not self.cache_dir.exists() or any(True for _ in self._scan()):
            return
        cutoff = time.time() - CACHE_GRACE_S
        for entry in self.cache_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()

    # -- observe -------------------------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        try:
            entries = sorted(self.vms_dir.iterdir())
        except FileNotFoundError:
            return
        for d in entries:
            if d.name.startswith(".") or not d.is_dir():
                continue
            meta = _read_json(d / META)
            if meta and "service" in meta and "component" in meta:
                yield d, meta

    def _workload(self, d: Path, meta: dict[str, Any], pid: int | None,
                  qmp_status: str = "") -> Workload:
        extra = {
            "pid": pid, "accel": meta.get("accel"), "image_sha256": meta.get("image_sha256"),
            "memory_mb": meta.get("memory_mb"), "vcpus": meta.get("vcpus"),
            "builder": meta.get("builder"), "machine": meta.get("machine"),
            "ports": meta.get("ports", []), "mac": meta.get("mac"),
            "state_dir": str(d), "console": str(d / CONSOLE),
        }
        if qmp_status:
            extra["qmp_status"] = qmp_status
        return Workload(service=meta["service"], component=meta["component"],
                        runtime=self.name, state=RUNNING if pid else STOPPED, id=d.name,
                        image=meta.get("image", ""), started_at=meta.get("started_at"),
                        extra=extra)

    def inspect(self, service: str, component: str) -> Workload | None:
        d, meta = self._meta(service, component)
        if meta is None:
            return None
        pid = self._pid(d, meta)
        status = ""
        if pid:
            try:
                status = str(qmp.execute(d / QMP_SOCK, "query-status").get("status", ""))
            except (qmp.QMPError, AttributeError) as exc:
                status = f"unreachable: {exc}"
            console_rotate(d / CONSOLE, self.cfg.console_max_bytes)
        w = self._workload(d, meta, pid, status)
        if pid and status and not status.startswith("unreachable") and status != "running":
            w.state = STOPPED   # paused, shutdown, internal-error: not serving
        return w

    def list(self) -> list[Workload]:
        """One pass over the state directories; no QMP, no subprocess."""
        out = []
        for d, meta in self._scan():
            pid = self._pid(d, meta)
            if pid:
                console_rotate(d / CONSOLE, self.cfg.console_max_bytes)
            out.append(self._workload(d, meta, pid))
        return out

    def logs(self, service: str, component: str, tail: int | None = None,
             follow: bool = False) -> Iterator[bytes]:
        d, meta = self._meta(service, component)
        if meta is None:
            raise NotFoundError(f"no VM {service}/{component} on this node")
        return self._logs(d, meta, tail, follow)

    def _logs(self, d: Path, meta: dict[str, Any], tail: int | None,
              follow: bool) -> Iterator[bytes]:
        path = d / CONSOLE
        data, cur, ino = b"", b"", None
        with contextlib.suppress(OSError):
            data = (d / (CONSOLE + ".1")).read_bytes()
        with contextlib.suppress(OSError), path.open("rb") as f:
            ino = os.fstat(f.fileno()).st_ino
            cur = f.read()
        # Follow from exactly what was read: a line written meanwhile is not skipped.
        pos = len(cur)
        data += cur
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail > 0 else b""
        if data:
            yield _lf(data)
        if not follow:
            return
        while True:
            try:
                st = path.stat()
            except FileNotFoundError:
                return
            if st.st_ino != ino or st.st_size < pos:   # rotated
                ino, pos = st.st_ino, 0
            if st.st_size > pos:
                with path.open("rb") as f:
                    f.seek(pos)
                    chunk = f.read(1 << 20)
                pos += len(chunk)
                yield _lf(chunk)
                continue
            if self._pid(d, meta) is None:
                return
            time.sleep(0.25)

    def info(self) -> dict[str, Any]:
        ok, missing = self.available()
        mem, cpus, n = self._usage()
        return {
            "available": ok, "missing": missing, "accel": self.accel if ok else "",
            "builder": self._builder_name, "machine": self.cfg.machine,
            "vms_running": n, "memory_mb_used": mem, "vcpus_used": cpus,
            "host_memory_mb": host_memory_mb(), "host_cpus": host_cpus(),
            "reserve_memory_mb": self.cfg.reserve_memory_mb,
        }

