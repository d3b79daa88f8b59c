"""What the VM image builders share: the request, the boot plan, the builder interface
and the few helpers every builder uses. A leaf: it imports no builder.

A builder (``ops.py``, ``nanos.py``, ``initramfs.py``) turns an extracted ELF into
image files and says how qemu boots them (``BootPlan``); ``builders.py`` picks one;
the runtime owns the rest of the qemu command line. Every command a builder runs is
built by a pure function, so its argv can be unit-tested, and run through
``run_tool``, which logs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import ImageError
from .grammar import Volume
from .netplan import NetAttach

log = logging.getLogger(__name__)

EM_X86_64 = 62
PT_INTERP = 3
# Top-level guest directories the VM's own files use: a program may not live there.
RESERVED_TOP = ("mcp", "proc", "sys", "dev", "run", "etc")


@dataclass(frozen=True)
class BuildRequest:
    """What goes into (or next to) an image: the program and how it runs."""

    service: str
    component: str
    elf: Path                        # the extracted ELF on the host
    guest_path: str = ""             # where it lives in the image (argv[0]); "" = /<elf name>
    argv: tuple[str, ...] = ()       # arguments after argv[0]
    env: tuple[str, ...] = ()        # KEY=VALUE, incl. PORT / PORT_<NAME>
    volumes: tuple[Volume, ...] = ()
    memory_mb: int = 256
    vcpus: int = 1
    ports: tuple[int, ...] = ()
    cache_dir: Path | None = None    # where a builder may keep images keyed by their inputs
    # (name, host file): given to the program as /run/secrets/<name> (issue 20); the
    # files, and so the image, live in a tmpfs directory only root can read
    secret_files: tuple[tuple[str, Path], ...] = ()
    net: NetAttach | None = None     # bridge mode: the guest's static address (issue 23)

    @property
    def program(self) -> str:
        """The ELF's absolute path inside the guest, normalised and checked."""
        path = self.guest_path or f"/{self.elf.name}"
        parts = path.split("/")
        if not path.startswith("/") or any(p in ("", ".", "..") for p in parts[1:]):
            raise ImageError(f"binary path {path!r} must be absolute and normalised")
        if parts[1] in RESERVED_TOP or path == "/init":
            raise ImageError(f"binary path {path!r} collides with the VM's own files")
        return path

    @property
    def program_name(self) -> str:
        return self.program.rsplit("/", 1)[1]


@dataclass(frozen=True)
class BootPlan:
    """How qemu boots a built image; the runtime adds machine, net, QMP, console."""

    builder: str
    image: str                        # the image file (the digest covers it)
    sha256: str = ""                  # its digest: computed by the runtime, not the builder
    kernel: str = ""                  # -kernel
    initrd: str = ""                  # -initrd
    append: str = ""                  # -append
    disk: str = ""                    # raw disk image (Nanos)
    fw_cfg: tuple[tuple[str, str], ...] = ()   # (name, host file) for -fw_cfg
    volumes: tuple[Volume, ...] = ()  # shared live over 9p, tagged by volume_tag(i)
    nanos: bool = False               # Nanos device layout (testbed.md)

    def to_dict(self) -> dict[str, Any]:
        return {
            "builder": self.builder, "sha256": self.sha256, "image": self.image,
            "kernel": self.kernel, "initrd": self.initrd, "append": self.append,
            "disk": self.disk, "fw_cfg": [list(x) for x in self.fw_cfg],
            "volumes": [{"host": v.host, "guest": v.guest, "options": list(v.options)}
                        for v in self.volumes],
            "nanos": self.nanos,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootPlan:
        return cls(
            builder=str(d["builder"]), sha256=str(d.get("sha256", "")), image=str(d["image"]),
            kernel=str(d.get("kernel", "")), initrd=str(d.get("initrd", "")),
            append=str(d.get("append", "")), disk=str(d.get("disk", "")),
            fw_cfg=tuple((str(n), str(f)) for n, f in d.get("fw_cfg", ())),
            volumes=tuple(Volume(str(v["host"]), str(v["guest"]),
                                 tuple(v.get("options", ())))
                          for v in d.get("volumes", ())),
            nanos=bool(d.get("nanos", False)))

    def relocated(self, src: Path, dst: Path) -> BootPlan:
        """The same plan with files under ``src`` moved under ``dst`` (build dir → final)."""
        def move(p: str) -> str:
            return str(dst / Path(p).relative_to(src)) if p and Path(p).is_relative_to(src) else p

        return BootPlan(
            builder=self.builder, sha256=self.sha256, image=move(self.image),
            kernel=move(self.kernel), initrd=move(self.initrd), append=self.append,
            disk=move(self.disk), fw_cfg=tuple((n, move(f)) for n, f in self.fw_cfg),
            volumes=self.volumes, nanos=self.nanos)


class Builder(Protocol):
    """Writes the image files; the runtime computes the image's digest (``sha256_file``)
    where it costs least: before boot when a pin must be checked, else while qemu
    initialises with the guest paused."""

    name: str

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, what is missing)."""

    def check(self, volumes: tuple[Volume, ...]) -> None:
        """Refuse, before anything changes, what this builder cannot run on the configured
        machine: ValidationError naming the field."""

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        """Write the image into directory ``out``; raise ImageError on failure."""


def volume_tag(i: int) -> str:
    """The 9p mount tag of a component's i-th volume (Linux guests mount it by name)."""
    return f"mcpvol{i}"


def run_tool(
    argv: list[str], *, timeout: float = 300, env: dict[str, str] | None = None,
    stdin: bytes | None = None, cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """The one place builders run external tools: logged, bounded, errors → ImageError."""
    log.info("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                              env=env, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{argv[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise ImageError(f"{' '.join(argv[:3])} exited {proc.returncode}: {err}")
    return proc


def find_tool(path_or_name: str) -> str | None:
    """An executable given as a path, or looked up on PATH."""
    if "/" in path_or_name:
        return path_or_name if os.access(path_or_name, os.X_OK) else None
    return shutil.which(path_or_name)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_into(path: Path, out: list[str | BaseException]) -> None:
    """``sha256_file`` for a thread: the digest, or what went wrong, appended to ``out``."""
    try:
        out.append(sha256_file(path))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        out.append(exc)


def elf_info(data: bytes, what: str) -> dict[str, object]:
    """Check an x86-64 ELF executable; return machine and whether it is static."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ImageError(f"{what} is not an ELF executable")
    if data[4] != 2 or data[5] != 1:
        raise ImageError(f"{what} is not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise ImageError(f"{what} is not an x86-64 ELF (machine {e_machine})")
    if e_type not in (2, 3):  # EXEC, DYN (static-pie)
        raise ImageError(f"{what} is not an executable ELF (type {e_type})")
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    interp = False
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            raise ImageError(f"{what} is a truncated ELF")
        if struct.unpack_from("<I", data, off)[0] == PT_INTERP:
            interp = True
    return {"machine": e_machine, "static": not interp}
