"""The nanos builder: a Nanos disk image written by Nanos's own ``mkfs`` (from a Nanos
build in ``[qemu] nanos_dir``: ``kernel.img``, ``boot.img``, ``mkfs``), no ops needed.

The manifest (Nanos's tuple syntax) names the program, its arguments and
environment. Volumes are shared live over virtio-9p, which this Nanos drives on
PCI only: on q35 each volume is a ``virtio-9p-pci`` device whose mount tag is its
index ``i``, which Nanos names ``virtfs<i>`` and mounts where the manifest's
``mounts`` says (an empty directory made in the image). On microvm (virtio-mmio)
Nanos has no 9p driver, so volumes are refused there before anything changes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath

from .config import QemuConfig
from .errors import ImageError, ValidationError
from .grammar import Volume, parse_env
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


def nanos_manifest(req: BuildRequest) -> str:
    """The manifest Nanos's mkfs reads: the ELF at its guest path, an empty directory per
    volume mount point, args, env and the ``mounts`` of the volumes."""
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


def nanos_mkfs_argv(mkfs: Path, boot: Path, kernel: Path, out: Path) -> list[str]:
    return [str(mkfs), "-b", str(boot), "-k", str(kernel), str(out)]


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
        manifest = nanos_manifest(req)
        (out / "app.manifest").write_text(manifest)
        disk = out / "disk.raw"
        run_tool(nanos_mkfs_argv(d / "mkfs", d / "boot.img", d / "kernel.img", disk),
                 stdin=manifest.encode())
        kernel = str(d / "kernel.img") if self.cfg.machine == "microvm" else ""
        return BootPlan(builder=self.name, image=str(disk),
                        disk=str(disk), kernel=kernel, volumes=req.volumes, nanos=True)
