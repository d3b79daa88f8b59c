"""The nanos builder: a Nanos disk image written by Nanos's own ``mkfs`` (from a Nanos
build in ``[qemu] nanos_dir``: ``kernel.img``, ``boot.img``, ``mkfs``), no ops needed.

The manifest (Nanos's tuple syntax) names the program, its arguments and
environment. The image is made reproducible, so an ``image_sha256`` pin can hold:
mkfs runs with address-space randomisation off (its tuple order follows its heap
addresses) and the two volume UUIDs it draws at random (printed as ``UUID: ...``) are
replaced by ones derived from the manifest.

Volumes are shared live over virtio-9p, which this Nanos drives on PCI only: on q35
each volume is a ``virtio-9p-pci`` device whose mount tag is its index ``i``, which
Nanos names ``virtfs<i>`` and mounts where the manifest's ``mounts`` says (an empty
directory made in the image). On microvm (virtio-mmio) Nanos has no 9p driver, so
volumes are refused there before anything changes.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath

from .config import QemuConfig
from .errors import ImageError, ValidationError
from .grammar import Volume, parse_env
from .netplan import resolv_conf
from .vmimage import BootPlan, BuildRequest, run_tool

log = logging.getLogger(__name__)

FILES = ("kernel.img", "boot.img", "mkfs")
_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")


def nanos_quote(value: str) -> str:
    """A value in Nanos's tuple syntax: bare when plain, else double-quoted with escapes."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nanos_volume_label(i: int) -> str:
    """The volume label Nanos gives the 9p device whose mount tag is ``str(i)``."""
    return f"virtfs{i}"


def check_volumes(volumes: tuple[Volume, ...], program: str | None = None) -> None:
    """Mount points must be distinct, not nested, not "/", and must not hide the program."""
    seen: list[tuple[int, PurePosixPath]] = []
    for i, v in enumerate(volumes):
        guest = PurePosixPath(v.guest)
        if guest == PurePosixPath("/"):
            raise ValidationError("cannot mount a volume on / of a Nanos guest", f"volumes[{i}]")
        if program and PurePosixPath(program).is_relative_to(guest):
            raise ValidationError(f"{v.guest} would hide the program {program}",
                                  f"volumes[{i}]")
        for j, other in seen:
            if guest.is_relative_to(other) or other.is_relative_to(guest):
                raise ValidationError(f"{v.guest} overlaps volumes[{j}] ({other})",
                                      f"volumes[{i}]")
        seen.append((i, guest))


def nanos_manifest(req: BuildRequest, resolv: Path | None = None) -> str:
    """The manifest Nanos's mkfs reads: the ELF at its guest path, an empty directory per
    volume mount point, args, env and the ``mounts`` of the volumes; in bridge mode
    ``resolv`` as its /etc/resolv.conf (the service's, not the workload's: the guest
    takes its address by DHCP from the service's dnsmasq, so the image is the same at
    either address of a start-first pair)."""
    check_volumes(req.volumes, req.program)
    tree: dict[str, object] = {}

    def place(guest: str, leaf: object) -> None:
        node = tree
        parts = [p for p in guest.split("/") if p]
        for part in parts[:-1]:
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ValidationError(f"guest path {guest!r} crosses a file", "volumes")
            node = sub
        node[parts[-1]] = leaf

    place(req.program, req.elf.resolve())
    for v in req.volumes:
        place(v.guest, {})
    for name, host in req.secret_files:   # read by mkfs into the image (on a tmpfs)
        place(f"/run/secrets/{name}", host)
    if req.net is not None and resolv is not None:
        place("/etc/resolv.conf", resolv)

    def render(node: dict[str, object]) -> str:
        items = []
        for name, val in sorted(node.items()):
            if isinstance(val, dict):
                items.append(f"{nanos_quote(name)}:(children:({render(val)}))")
            else:
                items.append(f"{nanos_quote(name)}:(contents:(host:{nanos_quote(str(val))}))")
        return " ".join(items)

    env = [("USER", "root"), ("PWD", "/"), *parse_env(req.env)]
    env_s = " ".join(f"{k}:{nanos_quote(v)}" for k, v in env)
    args = " ".join(nanos_quote(a) for a in (req.program_name, *req.argv))
    lines = [
        "(",
        f"    children:({render(tree)})",
        f"    program:{nanos_quote(req.program)}",
        f"    arguments:[{args}]",
        f"    environment:({env_s})",
    ]
    if req.volumes:
        mounts = " ".join(f"{nanos_volume_label(i)}:{nanos_quote(v.guest)}"
                          for i, v in enumerate(req.volumes))
        lines.append(f"    mounts:({mounts})")
    return "\n".join(lines) + "\n)\n"


def nanos_mkfs_argv(mkfs: Path, boot: Path, kernel: Path, out: Path,
                    setarch: str | None = None) -> list[str]:
    """mkfs's command line; under ``setarch <arch> -R`` (no ASLR) when given."""
    argv = [str(mkfs), "-b", str(boot), "-k", str(kernel), str(out)]
    return [setarch, platform.machine(), "-R", *argv] if setarch else argv


UUID_LINE = re.compile(rb"UUID: ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
UUID_NAMESPACE = uuid.UUID("5b0e8c2a-4a57-4f7e-9a43-6d63702d6e6f")


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the non-hole parts of a sparse file."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:      # ENXIO: a hole to the end
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def pin_uuids(disk: Path, mkfs_output: bytes, manifest: str) -> bool:
    """Replace each UUID mkfs printed by one derived from ``manifest`` (uuid5), where it
    occurs exactly once in the image; False (image untouched) otherwise."""
    drawn = [uuid.UUID(m.decode()) for m in UUID_LINE.findall(mkfs_output)]
    if not drawn:
        return False
    fd = os.open(disk, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        found: dict[bytes, list[int]] = {u.bytes: [] for u in drawn}
        for start, length in _data_extents(fd, size):
            chunk = os.pread(fd, length, start)
            for raw, at in found.items():
                i = chunk.find(raw)
                while i >= 0:
                    at.append(start + i)
                    i = chunk.find(raw, i + 1)
        if any(len(at) != 1 for at in found.values()):
            log.warning("nanos: mkfs's UUIDs not found once each in %s; left as drawn", disk)
            return False
        for i, u in enumerate(drawn):
            fixed = uuid.uuid5(UUID_NAMESPACE, f"{i}\0{manifest}")
            os.pwrite(fd, fixed.bytes, found[u.bytes][0])
    finally:
        os.close(fd)
    return True


def check_machine_volumes(machine: str, volumes: tuple[Volume, ...], builder: str) -> None:
    """Nanos mounts 9p volumes on q35 only (its 9p driver is PCI-only)."""
    if volumes and machine != "q35":
        raise ValidationError(
            f"a Nanos guest on {machine} cannot mount volumes (its 9p driver is PCI-only); "
            f"use [qemu] machine = \"q35\" or drop the volumes ({builder} builder)", "volumes")


class NanosBuilder:
    name = "nanos"
    FILES = FILES

    def __init__(self, cfg: QemuConfig) -> None:
        self.cfg = cfg

    def available(self) -> tuple[bool, str]:
        if not self.cfg.nanos_dir:
            return False, "Nanos files (nanos_dir unset; needs kernel.img, boot.img, mkfs)"
        d = Path(self.cfg.nanos_dir).expanduser()
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            return False, f"Nanos files ({', '.join(missing)} missing in {d})"
        return True, ""

    def check(self, volumes: tuple[Volume, ...]) -> None:
        check_machine_volumes(self.cfg.machine, volumes, self.name)
        check_volumes(volumes)
        for i, v in enumerate(volumes):
            if not Path(v.host).is_dir():
                raise ValidationError(f"{v.host} is not a directory on this node",
                                      f"volumes[{i}]")

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        ok, why = self.available()
        if not ok:
            raise ImageError(f"nanos builder unavailable: {why}")
        self.check(req.volumes)
        d = Path(self.cfg.nanos_dir).expanduser().resolve()
        resolv = None
        if req.net is not None:
            resolv = out / "resolv.conf"
            resolv.write_text(resolv_conf(req.net))
        manifest = nanos_manifest(req, resolv)
        (out / "app.manifest").write_text(manifest)
        disk = out / "disk.raw"
        setarch = shutil.which("setarch")
        proc = run_tool(nanos_mkfs_argv(d / "mkfs", d / "boot.img", d / "kernel.img", disk,
                                        setarch), stdin=manifest.encode())
        # The UUIDs from the manifest as it would be wherever this build happens to be
        # (its resolv.conf is a file of ``out``, a directory of its own each time).
        seed = nanos_manifest(req, Path("resolv.conf")) if resolv is not None else manifest
        if not (setarch and pin_uuids(disk, proc.stdout, seed)):
            log.warning("nanos: %s is not reproducible (setarch %s); an image_sha256 pin "
                        "cannot match it", disk, "found" if setarch else "missing")
        kernel = str(d / "kernel.img") if self.cfg.machine == "microvm" else ""
        return BootPlan(builder=self.name, image=str(disk),
                        disk=str(disk), kernel=kernel, volumes=req.volumes, nanos=True)
