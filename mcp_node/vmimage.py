"""VM image builders for the unikernel runtime (design §4).

Three builders share one small interface and are tried in order: ``ops``
(Nanos via the ops tool), ``nanos`` (Nanos's own ``mkfs`` from a Nanos build
in ``[qemu] nanos_dir``) and ``initramfs`` (a Linux kernel plus an initramfs,
in ``initramfs.py``). A builder turns an extracted ELF into image files and
says how qemu boots them (``BootPlan``); the runtime owns the rest of the
qemu command line. Every command is built by a pure function so its argv can
be unit-tested, and run through ``run_tool`` which logs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import QemuConfig
from .errors import ImageError, ValidationError

log = logging.getLogger(__name__)

ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EM_X86_64 = 62
PT_INTERP = 3


@dataclass(frozen=True)
class Volume:
    host: str
    guest: str
    readonly: bool = False


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


RESERVED_TOP = ("mcp", "proc", "sys", "dev", "run", "etc")


@dataclass(frozen=True)
class BootPlan:
    """How qemu boots a built image; the runtime adds machine, net, QMP, console."""

    builder: str
    sha256: str                       # digest of the image file (``image``)
    image: str                        # the file the digest covers
    kernel: str = ""                  # -kernel
    initrd: str = ""                  # -initrd
    append: str = ""                  # -append
    disk: str = ""                    # raw disk image (Nanos)
    fw_cfg: tuple[tuple[str, str], ...] = ()   # (name, host file) for -fw_cfg
    volumes: tuple[Volume, ...] = ()  # shared live over 9p (initramfs only)
    nanos: bool = False               # Nanos device layout (testbed.md)

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["fw_cfg"] = [list(x) for x in self.fw_cfg]
        d["volumes"] = [v.__dict__ for v in self.volumes]
        return d

    def relocated(self, src: Path, dst: Path) -> BootPlan:
        """The same plan with files under ``src`` moved under ``dst`` (build dir → final)."""
        def move(p: str) -> str:
            return str(dst / Path(p).relative_to(src)) if p and Path(p).is_relative_to(src) else p

        return BootPlan(
            builder=self.builder, sha256=self.sha256, image=move(self.image),
            kernel=move(self.kernel), initrd=move(self.initrd), append=self.append,
            disk=move(self.disk), fw_cfg=tuple((n, move(f)) for n, f in self.fw_cfg),
            volumes=self.volumes, nanos=self.nanos)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootPlan:
        data = dict(d)
        data["fw_cfg"] = tuple(tuple(x) for x in data.get("fw_cfg", ()))
        data["volumes"] = tuple(Volume(**v) for v in data.get("volumes", ()))
        return cls(**data)


class Builder(Protocol):
    name: str

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, what is missing)."""

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        """Write the image into directory ``out``; raise ImageError on failure."""


# -- helpers -----------------------------------------------------------------------------------

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def check_env(env: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for i, item in enumerate(env):
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise ValidationError(f"{item[:80]!r} is not KEY=VALUE", f"env[{i}]")
        pairs.append((key, value))
    return pairs


def parse_volumes(volumes: tuple[str, ...]) -> tuple[Volume, ...]:
    out = []
    for i, spec in enumerate(volumes):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
            raise ValidationError(f"{spec[:80]!r} is not /host:/guest[:ro]", f"volumes[{i}]")
        opts = parts[2].split(",") if len(parts) == 3 else []
        if any(o not in ("ro", "rw", "z", "Z") for o in opts):
            raise ValidationError(f"unsupported volume options in {spec[:80]!r}", f"volumes[{i}]")
        out.append(Volume(host=parts[0], guest=parts[1], readonly="ro" in opts))
    return tuple(out)


def _tool(path_or_name: str) -> str | None:
    if "/" in path_or_name:
        return path_or_name if os.access(path_or_name, os.X_OK) else None
    return shutil.which(path_or_name)


# -- ops ---------------------------------------------------------------------------------------

def ops_config(req: BuildRequest) -> dict[str, object]:
    """The ops config.json: program args, env, host dirs mapped in, memory and CPUs."""
    cfg: dict[str, object] = {
        "Args": [req.program_name, *req.argv],
        "Env": dict(check_env(req.env)),
        "RunConfig": {
            "Memory": f"{req.memory_mb}M",
            "CPUs": req.vcpus,
            "Ports": [str(p) for p in req.ports],
        },
    }
    if req.volumes:
        # Nanos has no live host shares here: the directory is copied into the image.
        cfg["MapDirs"] = {f"{v.host.rstrip('/')}/*": v.guest for v in req.volumes}
    return cfg


def ops_build_argv(ops: str, elf: Path, config: Path, image_name: str) -> list[str]:
    return [ops, "build", str(elf), "-c", str(config), "-i", image_name]


class OpsBuilder:
    name = "ops"

    def __init__(self, cfg: QemuConfig) -> None:
        self.cfg = cfg

    def available(self) -> tuple[bool, str]:
        if _tool(self.cfg.ops):
            return True, ""
        return False, f"ops ({self.cfg.ops!r} not on PATH)"

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        ops = _tool(self.cfg.ops)
        if not ops:
            raise ImageError("ops is not installed")
        conf = out / "config.json"
        conf.write_text(json.dumps(ops_config(req), indent=2, sort_keys=True))
        elf = out / req.program_name       # ops names the program after the file
        shutil.copyfile(req.elf, elf)
        os.chmod(elf, 0o755)  # noqa: S103 - an executable
        image_name = f"mcp-{req.service}-{req.component}-{os.getpid()}"
        run_tool(ops_build_argv(ops, elf, conf, image_name), cwd=out)
        built = Path.home() / ".ops" / "images" / image_name
        if not built.exists():
            built = built.with_suffix(".img")
        if not built.exists():
            raise ImageError(f"ops build did not produce {built}")
        disk = out / "disk.raw"
        shutil.move(str(built), disk)
        kernel = ""
        if self.cfg.machine == "microvm":
            kernels = sorted((Path.home() / ".ops").glob("*/kernel.img"))
            if not kernels:
                raise ImageError("microvm needs Nanos's kernel.img; none found under ~/.ops")
            kernel = str(kernels[-1])
        return BootPlan(builder=self.name, sha256=sha256_file(disk), image=str(disk),
                        disk=str(disk), kernel=kernel, nanos=True)


# -- nanos (mkfs from a Nanos build) -----------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")


def nanos_quote(value: str) -> str:
    """A value in Nanos's tuple syntax: bare when plain, else double-quoted with escapes."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nanos_manifest(req: BuildRequest, files: dict[str, Path] | None = None) -> str:
    """The manifest Nanos's mkfs reads: the ELF at /<name>, args, env, extra files.

    ``files`` maps absolute guest paths to host files (volumes are copied in:
    Nanos has no live host share in this layout).
    """
    tree: dict[str, object] = {}
    for guest, host in sorted({**(files or {}), req.program: req.elf}.items()):
        node = tree
        parts = [p for p in guest.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValidationError(f"bad guest path {guest!r}", "volumes")
        for part in parts[:-1]:
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ValidationError(f"guest path {guest!r} crosses a file", "volumes")
            node = sub
        node[parts[-1]] = host.resolve()

    def render(node: dict[str, object]) -> str:
        items = []
        for name, val in sorted(node.items()):
            if isinstance(val, dict):
                items.append(f"{nanos_quote(name)}:(children:({render(val)}))")
            else:
                items.append(f"{nanos_quote(name)}:(contents:(host:{nanos_quote(str(val))}))")
        return " ".join(items)

    env = [("USER", "root"), ("PWD", "/"), *check_env(req.env)]
    env_s = " ".join(f"{k}:{nanos_quote(v)}" for k, v in env)
    args = " ".join(nanos_quote(a) for a in (req.program_name, *req.argv))
    return (
        "(\n"
        f"    children:({render(tree)})\n"
        f"    program:{nanos_quote(req.program)}\n"
        f"    arguments:[{args}]\n"
        f"    environment:({env_s})\n"
        ")\n"
    )


def nanos_mkfs_argv(mkfs: Path, boot: Path, kernel: Path, out: Path) -> list[str]:
    return [str(mkfs), "-b", str(boot), "-k", str(kernel), str(out)]


def volume_files(volumes: tuple[Volume, ...], limit: int = 10000) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for v in volumes:
        root = Path(v.host)
        if not root.is_dir():
            raise ValidationError(f"{v.host} is not a directory", "volumes")
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                if p.is_file():
                    files[v.guest.rstrip("/") + "/" + str(p.relative_to(root))] = p
                    if len(files) > limit:
                        raise ValidationError(f"more than {limit} files to copy", "volumes")
    return files


class NanosBuilder:
    name = "nanos"
    FILES = ("kernel.img", "boot.img", "mkfs")

    def __init__(self, cfg: QemuConfig) -> None:
        self.cfg = cfg

    def available(self) -> tuple[bool, str]:
        if not self.cfg.nanos_dir:
            return False, "Nanos files (nanos_dir unset; needs kernel.img, boot.img, mkfs)"
        d = Path(self.cfg.nanos_dir).expanduser()
        missing = [f for f in self.FILES if not (d / f).is_file()]
        if missing:
            return False, f"Nanos files ({', '.join(missing)} missing in {d})"
        return True, ""

    def build(self, req: BuildRequest, out: Path) -> BootPlan:
        ok, why = self.available()
        if not ok:
            raise ImageError(f"nanos builder unavailable: {why}")
        d = Path(self.cfg.nanos_dir).expanduser().resolve()
        manifest = nanos_manifest(req, volume_files(req.volumes))
        (out / "app.manifest").write_text(manifest)
        disk = out / "disk.raw"
        run_tool(nanos_mkfs_argv(d / "mkfs", d / "boot.img", d / "kernel.img", disk),
                 stdin=manifest.encode())
        kernel = str(d / "kernel.img") if self.cfg.machine == "microvm" else ""
        return BootPlan(builder=self.name, sha256=sha256_file(disk), image=str(disk),
                        disk=str(disk), kernel=kernel, nanos=True)


@dataclass
class BuilderChoice:
    builder: Builder | None
    missing: list[str] = field(default_factory=list)


def choose_builder(cfg: QemuConfig) -> BuilderChoice:
    """First available builder in the order ops → nanos → initramfs, or what each lacks."""
    from .initramfs import InitramfsBuilder

    missing: list[str] = []
    candidates: list[Builder] = [OpsBuilder(cfg), NanosBuilder(cfg), InitramfsBuilder(cfg)]
    for b in candidates:
        ok, why = b.available()
        if ok:
            return BuilderChoice(b, missing)
        missing.append(why)
    return BuilderChoice(None, missing)
