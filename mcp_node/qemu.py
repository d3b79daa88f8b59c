"""The unikernel runtime: each component a QEMU VM (design §4).

State lives on disk only (``vmstate.py``), so a restarted agent re-adopts running VMs
by reading it and never has to kill anything on start. qemu runs daemonised;
liveness is "pid alive *and* /proc/<pid>/cmdline is this VM's qemu", which guards
against pid reuse.

``run`` goes in four steps: the ELF (``_elf``: extracted from the OCI image; no podman
call while the image store is unchanged), the image (``_image``: built by the node's
builder, a pin checked), the install (``_install``: image and ``VMMeta`` put in place
once the old VM is stopped) and the launch (``_launch``: qemu started with the guest
paused while the image is hashed, then let run; ``vmlaunch``).

What a guest gets on stop depends on the machine type: on q35 the ACPI power button
(the program gets SIGTERM, the guest powers off), waited for up to the stop timeout,
then QMP ``quit``, then SIGKILL. A Nanos guest on microvm gets the SIGTERM too but
cannot power itself off, so it is not waited for: ``quit`` follows after a short grace
(``MICROVM_GRACE_S``) for the program's handler. How qemu is started and stopped is
``vmlaunch``'s; which VM, when, and under which lock is decided here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import qmp, vmcheck, vmlaunch
from .builders import choose_builder, config_problems
from .config import AgentConfig
from .elfcheck import check_static
from .errors import (
    ConflictError,
    ImageError,
    NotFoundError,
    RuntimeUnavailable,
    ValidationError,
    WorkloadError,
)
from .files import host_memory_mb, unlink_quietly
from .grammar import Volume, parse_volumes, resolve_volumes, volume_roots
from .initramfs import find_busybox, find_kernel
from .kvmprobe import GuestProbe, choose_accel, linux_guest, nanos_guest
from .podman_images import gone_message, image_digest
from .qemuargs import VMParams, mac_for
from .readiness import connect
from .registries import Registries
from .runtime import NEXT, OLD, Runtime, Workload, WorkloadSpec, side_key, slot_of, split_key
from .runtimenames import UNIKERNEL
from .secretfiles import SecretDirs, vm_build
from .servicedef import SHA256_RE, check_name
from .states import State
from .vmimage import BootPlan, Builder, BuildRequest, sha256_file
from .vmpull import ElfCache, Podman, PulledELF, pull_image, remove_image
from .vmstate import (
    GuestRuns,
    VMDir,
    VMMeta,
    check_room,
    console_rotate,
    host_cpus,
    live_pid,
    read_console,
    read_meta,
    stop_text,
    write_meta,
)

log = logging.getLogger(__name__)

# The builders whose guest holds the program alone, and what to call that guest.
STATIC_BUILDERS = {"nanos": "a Nanos unikernel", "initramfs": "the initramfs builder's VM"}


class QemuRuntime(Runtime):
    traits = UNIKERNEL
    name = UNIKERNEL.name

    def __init__(self, config: AgentConfig, state_dir: Path, owner: str) -> None:
        self.config = config
        self.cfg = config.qemu
        self.owner = owner
        # Absolute: qemu runs with its cwd in the VM directory, so a relative pidfile or
        # console path (``--state-dir ./st``) would resolve below it.
        self.state_dir = Path(state_dir).absolute()
        self.vms_dir = self.state_dir / "vms"
        self.cache_dir = self.state_dir / "vm-cache"
        self.volume_roots = volume_roots(config.podman.volume_roots, state_dir)
        self.podman = Podman(containers_conf=config.podman.containers_conf,
                             registries=Registries(config.registries, self.state_dir))
        self.elfs = ElfCache(self.podman, self.cache_dir)
        self.secret_dirs = SecretDirs(config.secrets, owner)   # secret images, on a tmpfs
        # a VM's secret image lives until its qemu runs: one a crash cut short is gone
        self.secret_dirs.reap(self.secret_dirs.leftovers(vm=True))
        self._accel: str | None = None
        self._avail: tuple[bool, str] | None = None
        self._builder: Builder | None = None
        self._lock = threading.RLock()            # capacity check + launch, dir claims
        self._guard = threading.Lock()            # _vm_locks
        self._accel_lock = threading.Lock()       # the accel probe (seconds, once)
        self._vm_locks: dict[str, threading.RLock] = {}
        self._guests = GuestRuns()                # which qemu are known to run their guest

    # -- enablement ----------------------------------------------------------------------------

    def _qemu_binary(self) -> str | None:
        b = self.cfg.binary
        if "/" in b:
            return b if os.access(b, os.X_OK) else None
        return shutil.which(b)

    @classmethod
    def config_problems(cls, config: AgentConfig) -> list[str]:
        return config_problems(config.qemu)

    def health_reasons(self) -> list[str]:
        """A builder the config names that cannot work (e.g. ``nanos_dir`` without the
        files): the node runs VMs with another builder, or none, and says so."""
        return [f"unikernel: {p}" for p in self.config_problems(self.config)]

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, every missing piece). Rechecked until it succeeds."""
        if self._avail and self._avail[0]:
            return self._avail
        missing = []
        if not self._qemu_binary():
            missing.append(f"qemu binary ({self.cfg.binary!r} not found)")
        choice = choose_builder(self.cfg)
        self._builder = choice.builder
        if choice.builder is None:
            missing.append("an image builder: " + "; ".join(choice.missing))
        if not shutil.which(self.podman.binary):
            missing.append("podman (to extract the ELF from the image)")
        self._avail = (not missing, "; ".join(missing))
        return self._avail

    @property
    def builder(self) -> Builder | None:
        """The node's image builder (chosen once, by ``builders.choose_builder``)."""
        self.available()
        return self._builder

    @property
    def builder_name(self) -> str:
        b = self.builder
        return b.name if b else ""

    @property
    def accel(self) -> str:
        """kvm only if configured or a probe boot under KVM printed; cached."""
        with self._accel_lock:
            if self._accel is None:
                guest = self._probe_guest() if self.cfg.accel == "auto" else None
                self._accel = choose_accel(
                    self.cfg.accel, self.vms_dir / ".accel-probe.json",
                    self._qemu_binary() or self.cfg.binary, guest)
            return self._accel

    def _probe_guest(self) -> GuestProbe | None:
        """The KVM probe's stage 2: a guest like the ones the node's builder makes."""
        name = self.builder_name
        if name == "nanos":
            return nanos_guest(Path(self.cfg.nanos_dir).expanduser(), self.cfg.machine)
        kernel, busybox = find_kernel(self.cfg)[0], find_busybox()
        if name == "initramfs" and kernel is not None and busybox is not None:
            return linux_guest(kernel, busybox)
        return None

    @property
    def graceful_stop(self) -> bool:
        """False on microvm: a Nanos guest there cannot power itself off."""
        return self.cfg.machine != "microvm"

    def _require(self) -> Builder:
        ok, why = self.available()
        if not ok or self._builder is None:
            raise RuntimeUnavailable(f"unikernel runtime unavailable on this node: missing {why}")
        return self._builder

    # -- paths and names -----------------------------------------------------------------------

    def _dir(self, service: str, component: str) -> VMDir:
        """``component`` is a workload key: a slot (``side_key``) is a suffix of the dir."""
        base, slot = split_key(component)
        check_name(service, "service")
        check_name(base, "component")
        if slot not in ("", NEXT, OLD):
            raise ValidationError(f"{slot[:20]!r} is not a workload slot", "component")
        return VMDir(self.vms_dir / f"{service}-{side_key(base, slot)}")

    def _vm_lock(self, d: VMDir) -> threading.RLock:
        with self._guard:
            return self._vm_locks.setdefault(d.name, threading.RLock())

    def _meta(self, service: str, component: str) -> tuple[VMDir, VMMeta | None]:
        """The VM's dir and meta; a dir owned by another (service, component) is a conflict."""
        d = self._dir(service, component)
        meta = read_meta(d)
        if meta and (meta.service, meta.component) != (service, split_key(component)[0]):
            raise ConflictError(
                f"VM state directory {d.name} belongs to service {meta.service!r} "
                f"component {meta.component!r}; {service}/{component} maps to the same name")
        return d, meta

    # -- resources -----------------------------------------------------------------------------

    def _usage(self, exclude: str = "") -> tuple[int, int, int]:
        mem = cpus = n = 0
        for d, meta in self._scan():
            if d.name != exclude and live_pid(d, meta):
                mem += meta.memory_mb
                cpus += meta.vcpus
                n += 1
        return mem, cpus, n

    def check_capacity(self, spec: WorkloadSpec, replacing: bool) -> None:
        """Refuse a VM that would overcommit host memory (minus the reserve) or CPUs."""
        self._check_spec(spec)
        d = self._dir(spec.service, spec.key)
        self._check_room(spec.name, int(spec.memory_mb or 0), spec.vcpus,
                         exclude=d.name if replacing else "")

    def _check_room(self, name: str, mem: int, vcpus: int, exclude: str) -> None:
        used, _cpus, n = self._usage(exclude=exclude)
        check_room(name, mem, vcpus, used, n, self.cfg.reserve_memory_mb,
                   self.cfg.reserve_vcpus)

    def _check_spec(self, spec: WorkloadSpec) -> tuple[Volume, ...]:
        """Every rule a spec must meet, before anything changes; its volumes, parsed."""
        check_name(spec.service, "service")
        check_name(spec.component, "component")
        if spec.memory_mb is None or spec.memory_mb <= 0:
            raise ValidationError("must be > 0 for a unikernel component", "memory_mb")
        if spec.vcpus < 1:
            raise ValidationError("must be >= 1", "vcpus")
        if spec.image_sha256 and not SHA256_RE.fullmatch(spec.image_sha256):
            raise ValidationError("must be 64 lowercase hex digits", "image_sha256")
        volumes = parse_volumes(spec.volumes)
        if self.builder is not None:
            self.builder.check(volumes)   # what the node's builder cannot run here
        return volumes

    # -- the ELF -------------------------------------------------------------------------------

    def pull(self, spec: WorkloadSpec) -> None:
        """Get the image and extract the ELF into the cache; ImageError if it is not there."""
        self._check_spec(spec)
        self._elf(spec)

    def resolve(self, spec: WorkloadSpec, always: bool = False) -> str:
        """The ID of the OCI image the ELF comes from (see Runtime.resolve); the ELF is
        extracted from that image, by ID, at every run."""
        self._check_spec(spec)
        if not shutil.which(self.podman.binary):
            raise RuntimeUnavailable("unikernel runtime needs podman to extract the ELF")
        if spec.image_digest:
            if self.podman.run("image", "exists", spec.image_digest,
                               check=False).returncode != 0:
                raise ImageError(gone_message(spec.image, spec.image_digest))
        elif always:
            pull_image(self.podman, spec.image, spec.component)
        pulled, elf = self._elf(spec)
        self._check_static(spec, pulled, elf)
        return image_digest(pulled.image_id) if pulled.image_id else ""

    def _check_static(self, spec: WorkloadSpec, pulled: PulledELF, elf: Path) -> None:
        """At deploy, before anything is created: a dynamic program would fail at every
        boot (its guest holds no loader). ops packs the libraries: not checked."""
        needs = STATIC_BUILDERS.get(self.builder_name)
        if needs is not None:
            what = pulled.binary if spec.binary else f"{pulled.binary} (the image's Entrypoint)"
            check_static(elf.read_bytes(), what, "binary", needs)

    def remove_image(self, digest: str, names: frozenset[str]) -> str:
        return remove_image(self.podman, digest, names)

    def _elf(self, spec: WorkloadSpec) -> tuple[PulledELF, Path]:
        """The ELF step of ``run``: the cached extraction while the image store is
        unchanged (no podman call), else pulled and extracted again."""
        if not shutil.which(self.podman.binary):
            raise RuntimeUnavailable("unikernel runtime needs podman to extract the ELF")
        return self.elfs.fetch(spec.run_image, spec.binary, spec.component, spec.cmd)

    # -- run -----------------------------------------------------------------------------------

    def run(self, spec: WorkloadSpec) -> Workload:
        """Build the image, verify a pin, then replace any running VM and boot the new one."""
        volumes = self._check_spec(spec)
        resolve_volumes(volumes, self.volume_roots)   # refused before anything changes
        for p in spec.ports:
            if not 1 <= p <= 65535:
                raise ValidationError(f"port {p} out of range", "ports")
        builder = self._require()
        d, _meta = self._meta(spec.service, spec.key)
        with self._vm_lock(d):
            pulled, elf = self._elf(spec)
            tmp, env, files = vm_build(self.secret_dirs, spec, self.secret_source,
                                       self.vms_dir, f".build-{d.name}-")
            created = False
            try:
                req = BuildRequest(
                    service=spec.service, component=spec.component, elf=elf,
                    guest_path=pulled.binary or f"/usr/local/bin/{spec.component}",
                    argv=pulled.argv, env=env, volumes=volumes, secret_files=files,
                    memory_mb=int(spec.memory_mb or 0), vcpus=spec.vcpus, ports=spec.ports,
                    cache_dir=self.cache_dir, net=spec.net)
                plan = self._image(spec, builder, req, tmp)
                accel = self.accel
                self.check_capacity(spec, replacing=True)   # refuse before touching the old VM
                self.stop(spec.service, spec.key, spec.stop_timeout_s)
                with self._lock:
                    created = not d.path.exists()
                    meta = self._install(spec, pulled, d, tmp, plan, accel)
                    meta, pid = self._launch(d, meta)
                if self.secret_dirs.owns(str(tmp)):   # qemu has it open: none of it stays
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if created:
                    shutil.rmtree(d.path, ignore_errors=True)
                raise
        return self._workload(d, meta, pid)

    def _image(self, spec: WorkloadSpec, builder: Builder, req: BuildRequest,
               out: Path) -> BootPlan:
        """The image step: build into ``out``. A pin is checked here, before anything
        boots; without one the digest is taken at launch, while qemu initialises."""
        plan = builder.build(req, out)
        if spec.image_sha256:
            digest = sha256_file(Path(plan.image))
            if digest != spec.image_sha256:
                raise ImageError(
                    f"image digest mismatch for {spec.name}: built {digest}, "
                    f"image_sha256 pins {spec.image_sha256}; not booting it")
            plan = replace(plan, sha256=digest)
        return plan

    def _install(self, spec: WorkloadSpec, pulled: PulledELF, d: VMDir, tmp: Path,
                 plan: BootPlan, accel: str) -> VMMeta:
        """The install step (the old VM is stopped): claim and capacity checked again,
        image and meta put in place."""
        d, _old = self._meta(spec.service, spec.key)  # re-check the claim
        self.check_capacity(spec, replacing=True)
        d.path.mkdir(exist_ok=True)
        old = d.path / "image.old"
        shutil.rmtree(old, ignore_errors=True)
        if d.image.exists():
            os.replace(d.image, old)
        sealed = self.secret_dirs.owns(str(tmp))   # built on a tmpfs, with its secrets
        d.image.mkdir() if sealed else os.replace(tmp, d.image)
        shutil.rmtree(old, ignore_errors=True)
        meta = VMMeta(
            service=spec.service, component=spec.component, image=spec.image,
            binary=pulled.binary or spec.binary, builder=plan.builder,
            image_sha256=plan.sha256, memory_mb=int(spec.memory_mb or 0), vcpus=spec.vcpus,
            machine=self.cfg.machine, accel=accel, ports=tuple(spec.ports),
            mac=mac_for(spec.service, spec.component, spec.net), stop_timeout_s=spec.stop_timeout_s,
            boot=plan if sealed else plan.relocated(tmp, d.image), started_at=time.time(),
            owner=self.owner, spec_digest=spec.digest,
            tap=spec.net.tap if spec.net else "", address=spec.net.address if spec.net else "")
        write_meta(d, meta)
        return meta

    def params(self, d: VMDir, meta: VMMeta, paused: bool = False) -> VMParams:
        return vmlaunch.vm_params(self._qemu_binary() or self.cfg.binary, d, meta, paused)

    def _launch(self, d: VMDir, meta: VMMeta) -> tuple[VMMeta, int]:
        """The launch step (``vmlaunch.launch``): the meta (with the image digest) and
        qemu's pid once the guest runs. Meanwhile listings do not ask QMP: the guest is
        held while its image is hashed, a pause of this launch's own, not one found."""
        with self._guests.launching(d):
            meta, pid = vmlaunch.launch(d, meta, self._qemu_binary() or self.cfg.binary,
                                        self.volume_roots, self.cfg.console_max_bytes)
            self._guests.runs(d, pid)
            log.info("qemu %s: running, pid %d", d.name, pid)
            return meta, pid

    def start(self, service: str, component: str) -> bool:
        """Boot a stopped VM again from its image as it is (its disk and console kept);
        False when there is no VM to start. A live one whose guest does not run is let
        run, or killed and booted again when it cannot be."""
        d, meta = self._meta(service, component)
        if meta is None or not d.image.is_dir():
            return False
        self._require()
        with self._vm_lock(d):
            pid = live_pid(d, meta)
            if pid:
                if self._resume(d, meta, pid):
                    return True
                log.warning("qemu %s: its guest cannot run; booting it again", d.name)
                vmlaunch.kill(d, meta, pid)
                meta = read_meta(d) or meta
            if not Path(meta.boot.image).exists():   # a secret image, gone after its boot
                return False
            with self._lock:
                self._check_room(meta.name, meta.memory_mb, meta.vcpus, exclude=d.name)
                meta = replace(meta, started_at=time.time())
                write_meta(d, meta)
                self._launch(d, meta)
        return True

    def _resume(self, d: VMDir, meta: VMMeta, pid: int) -> bool:
        """Let a live VM's guest run: one left in ``prelaunch`` (the agent died between
        launch and ``cont``) or ``paused``. False when it cannot (QMP unreachable,
        internal-error, guest-panicked ...). An image not hashed yet is hashed first,
        as ``_launch`` would have: the guest has not run, so it is the image as built."""
        status = self._guests.status(d, pid, fresh=True)
        if status == "running":
            return True
        if status not in qmp.HALTED:
            log.warning("qemu %s: guest %s", d.name, status)
            return False
        log.warning("qemu %s: found its guest %s; continuing it", d.name, status)
        try:
            if not meta.image_sha256:
                digest = sha256_file(Path(meta.boot.image))
                write_meta(d, replace(meta, image_sha256=digest,
                                      boot=replace(meta.boot, sha256=digest)))
            qmp.execute(d.qmp, "cont")
        except (qmp.QMPError, OSError) as exc:
            log.warning("qemu %s: cannot continue it: %s", d.name, exc)
            return False
        return self._guests.status(d, pid, fresh=True) == "running"

    # -- stop / remove -------------------------------------------------------------------------

    def stop(self, service: str, component: str, timeout: float = 10.0) -> None:
        """Power button, then (bounded) wait, QMP quit, SIGKILL (``vmlaunch.stop``: a
        microvm guest is not waited for). Stopped or missing: no-op."""
        d, meta = self._meta(service, component)
        if meta is None:
            return
        with self._vm_lock(d):
            pid = live_pid(d, meta)
            if pid is not None:
                vmlaunch.stop(d, meta, pid, timeout, self._guests.status(d, pid))

    def promote(self, service: str, component: str) -> None:
        """Two directory renames; qemu keeps running in each (its pidfile is outside the
        dir, ``VMMeta.pidfile``; QMP and the console are reached through the dir)."""
        own, nxt, old = (self._dir(service, side_key(component, s)) for s in ("", NEXT, OLD))
        if read_meta(nxt) is None:
            raise WorkloadError(f"qemu: no {nxt.name} to promote")
        self.remove(service, side_key(component, OLD))
        with self._lock, self._vm_lock(own), self._vm_lock(nxt):
            for d, to in ((own, old), (nxt, own)):
                meta = read_meta(d)
                if meta is None:
                    continue
                # Its pidfile is outside the dir (``VMMeta.pidfile``); its image moves.
                write_meta(d, replace(meta, boot=meta.boot.relocated(d.image, to.image)))
                os.replace(d.path, to.path)
                self._guests.forget(d)
        log.info("qemu %s: promoted %s (the one it replaces is %s)", own.name, nxt.name,
                 old.name)

    def remove(self, service: str, component: str) -> None:
        d, meta = self._meta(service, component)
        if meta is None and not d.path.exists():
            return
        with self._vm_lock(d):
            if meta is not None:
                self.stop(service, component, meta.stop_timeout_s)
                if meta.pidfile:   # a killed qemu leaves it; the last one, its dir
                    unlink_quietly(Path(meta.pidfile))
                    with contextlib.suppress(OSError):
                        Path(meta.pidfile).parent.rmdir()
            shutil.rmtree(d.path)
            self._guests.forget(d)
            with self._guard:   # nothing of a removed VM stays (its service lock is held)
                self._vm_locks.pop(d.name, None)
        self._prune_cache()

    def _prune_cache(self) -> None:
        """Drop extracted ELFs once no VM is left (they are cheap to extract again)."""
        if not any(True for _ in self._scan()):
            self.elfs.prune()

    # -- observe -------------------------------------------------------------------------------

    def _scan(self, prefix: str | None = None) -> Iterator[tuple[VMDir, VMMeta]]:
        """Each VM dir with its meta (those whose name begins with ``prefix``)."""
        try:
            entries = sorted(self.vms_dir.iterdir())
        except FileNotFoundError:
            return
        for p in entries:
            if p.name.startswith(".") or not p.is_dir() or (
                    prefix is not None and not p.name.startswith(prefix)):
                continue
            d = VMDir(p)
            meta = read_meta(d)
            if meta is not None:
                yield d, meta

    def _workload(self, d: VMDir, meta: VMMeta, pid: int | None,
                  qmp_status: str = "") -> Workload:
        extra: dict[str, Any] = {
            "pid": pid, "accel": meta.accel, "image_sha256": meta.image_sha256,
            "memory_mb": meta.memory_mb, "vcpus": meta.vcpus, "builder": meta.builder,
            "machine": meta.machine, "ports": list(meta.ports), "mac": meta.mac,
            "stop": stop_text(meta.machine, meta.stop_timeout_s),
            "state_dir": str(d.path), "console": str(d.console),
        }
        if qmp_status:
            extra["qmp_status"] = qmp_status
        # A live qemu whose guest does not run (prelaunch, paused, internal-error ...) is
        # not serving: stopped, and ``paused`` says why (QMP unreachable: left running).
        paused = qmp_status if pid and qmp.stopped(qmp_status) else ""
        key = side_key(meta.component, slot_of(d.name))
        return Workload(service=meta.service, component=key, runtime=self.name,
                        state=State.RUNNING if pid and not paused else State.STOPPED,
                        id=d.name, image=meta.image, started_at=meta.started_at, extra=extra,
                        spec_digest=meta.spec_digest, paused=paused)

    def inspect(self, service: str, component: str) -> Workload | None:
        d, meta = self._meta(service, component)
        if meta is None:
            return None
        pid = live_pid(d, meta)
        status = ""
        if pid:
            status = self._guests.status(d, pid, fresh=True)
            console_rotate(d.console, self.cfg.console_max_bytes)
        return self._workload(d, meta, pid, status)

    def list(self, service: str | None = None) -> list[Workload]:
        """One pass over the state directories, no subprocess; QMP only for a qemu not
        yet known to run its guest (once per process: one adopted after a crash)."""
        out = []
        for d, meta in self._scan(None if service is None else f"{service}-"):
            if service is not None and meta.service != service:
                continue
            pid = live_pid(d, meta)
            status = ""
            if pid:
                status = self._guests.status(d, pid)
                console_rotate(d.console, self.cfg.console_max_bytes)
            out.append(self._workload(d, meta, pid, status))
        return out

    def logs(self, service: str, component: str, tail: int | None = None,
             follow: bool = False, max_bytes: int | None = None,
             timestamps: bool = False) -> Iterator[bytes]:
        d, meta = self._meta(service, component)
        if meta is None:
            raise NotFoundError(f"no VM {service}/{component} on this node")
        return read_console(d, tail, follow, lambda: live_pid(d, meta) is not None, max_bytes,
                            meta.started_at if timestamps else None)

    def tcp_by_connect(self, service: str, component: str) -> bool:
        """Bridged and running: the host port is DNATed to the guest itself."""
        d, meta = self._meta(service, component)
        return meta is not None and bool(meta.tap) and live_pid(d, meta) is not None

    def tcp_check(self, service: str, component: str, port: int, timeout: float) -> str:
        """The guest must accept, not QEMU's forwarder (``vmcheck``)."""
        d, meta = self._meta(service, component)
        pid = live_pid(d, meta) if meta is not None else None
        if pid is None:
            return "no qemu process"
        if meta is not None and meta.tap:   # bridged: the host port is DNAT to the guest
            return connect(port, timeout)
        return vmcheck.guest_accepts(d.qmp, pid, port, timeout)

    # -- what status and health show -----------------------------------------------------------

    def status_extra(self, spec: WorkloadSpec, observed: Workload | None) -> dict[str, Any]:
        extra = observed.extra if observed is not None else {}
        planned = {
            "image_sha256": spec.image_sha256 or None, "memory_mb": spec.memory_mb,
            "vcpus": spec.vcpus, "accel": None, "pid": None,
            "builder": self.builder_name or None,
            "stop": stop_text(self.cfg.machine, spec.stop_timeout_s),
        }
        return {k: extra.get(k, v) for k, v in planned.items()}

    def info(self) -> dict[str, Any]:
        try:
            ok, missing = self.available()
            mem, cpus, n = self._usage()
            return {
                "available": ok, "missing": missing, "accel": self.accel if ok else "",
                "builder": self.builder_name, "machine": self.cfg.machine,
                "stop": stop_text(self.cfg.machine, 10.0),
                "vms_running": n, "memory_mb_used": mem, "vcpus_used": cpus,
                "host_memory_mb": host_memory_mb(), "host_cpus": host_cpus(),
                "reserve_memory_mb": self.cfg.reserve_memory_mb,
            }
        except Exception as exc:  # noqa: BLE001 - health must not raise
            log.exception("qemu: info failed")
            return {"available": False, "missing": f"runtime error: {exc}"}
