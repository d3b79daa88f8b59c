"""Secrets as the runtimes hand them to workloads (issue 20), never on the host's disk in
clear: each workload's secret files live in a directory of their own on a tmpfs
(``[secrets] runtime_dir``; default ``/run/mcp-secrets`` when /run is a tmpfs, else
``/dev/shm/mcp-secrets``), 0700 directories, 0400 files, under ``<dir>/<node id>/``.
A directory that is not on a tmpfs (or ramfs) is refused, naming the key.

A container bind-mounts each file read-only at ``/run/secrets/<name>``; a VM's image is
built in such a directory and removed once qemu has opened it. Env values
``secret:NAME`` are put in at create time (``resolved_env``), from the versions the
definition recorded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WorkloadError
from .grammar import parse_env, secret_ref

if TYPE_CHECKING:
    from .config import SecretsConfig
    from .runtime import WorkloadSpec

MEMORY_FS = ("tmpfs", "ramfs")
LEFTOVER_AGE_S = 60.0   # a secret directory this old that nothing uses was left by a crash
log = logging.getLogger("mcp_node.secrets")
GUEST_DIR = "/run/secrets"
Source = Callable[[str, int], bytes]


def _unescape(field: str) -> str:
    """A mountinfo path: spaces and the like are octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fs_type(path: Path, mountinfo: str | None = None) -> str:
    """The filesystem type of the mount ``path`` (or its nearest existing parent) is on."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        parts = left.split()
        if not sep or len(parts) < 5:
            continue
        point = _unescape(parts[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0] if right.split() else ""
    return kind


def runtime_root(cfg: SecretsConfig) -> Path:
    if cfg.runtime_dir:
        return Path(cfg.runtime_dir)
    for base in ("/run", "/dev/shm"):
        if fs_type(Path(base)) in MEMORY_FS and os.access(base, os.W_OK):
            return Path(base) / "mcp-secrets"
    return Path("/run/mcp-secrets")   # not a tmpfs here: refused when a secret needs it


def versions_of(spec: WorkloadSpec) -> dict[str, int]:
    return dict(spec.secret_versions)


def value_of(spec: WorkloadSpec, name: str, source: Source | None) -> bytes:
    version = versions_of(spec).get(name)
    if source is None or version is None:
        raise WorkloadError(f"{spec.name}: secret {name} has no recorded version on this "
                            "node; deploy the service again")
    return source(name, version)


def file_values(spec: WorkloadSpec, source: Source | None) -> dict[str, bytes]:
    """``secrets``' values by name (empty when it names none)."""
    return {n: value_of(spec, n, source) for n in spec.secrets}


def resolved_env(spec: WorkloadSpec, source: Source | None) -> tuple[str, ...]:
    """``spec.env`` with each ``secret:NAME`` value replaced by the secret (text)."""
    out = []
    for key, value in parse_env(spec.env):
        name = secret_ref(value)
        if name is not None:
            raw = value_of(spec, name, source)
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = "\x00"
            if "\x00" in value:
                raise WorkloadError(f"{spec.name}: secret {name} is not UTF-8 text without "
                                    f"NUL, so it cannot be the value of {key}; give it as "
                                    "a file (secrets = [...])")
        out.append(f"{key}={value}")
    return tuple(out)


def uses_secrets(spec: WorkloadSpec) -> bool:
    return bool(spec.secrets) or any(secret_ref(item.partition("=")[2]) is not None
                                     for item in spec.env)


class SecretDirs:
    """The per-workload directories of one agent (``<root>/<owner>/<workload>.<random>``)."""

    def __init__(self, cfg: SecretsConfig, owner: str) -> None:
        self.base = runtime_root(cfg) / owner
        self.configured = bool(cfg.runtime_dir)

    def make(self, workload: str) -> Path:
        """A new 0700 directory on a tmpfs; WorkloadError (nothing made) when it is not."""
        kind = fs_type(self.base)
        if kind not in MEMORY_FS:
            raise WorkloadError(
                f"{self.base} is on {kind or 'an unknown filesystem'}, not a tmpfs: secret "
                "files are never written to disk; set [secrets] runtime_dir to a directory "
                "on a tmpfs")
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.base, 0o700)
        os.chmod(self.base.parent, 0o700)
        return Path(tempfile.mkdtemp(prefix=f"{workload}.", dir=self.base))

    def write(self, workload: str, files: dict[str, bytes]) -> Path:
        """``files`` (name -> value) as 0400 files of a new directory; returns it."""
        d = self.make(workload)
        try:
            for name, value in files.items():
                fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o400)
                try:
                    os.write(fd, value)
                finally:
                    os.close(fd)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d

    def owns(self, path: str) -> bool:
        return Path(path).is_relative_to(self.base)

    def leftovers(self, vm: bool, in_use: Iterable[str] = (),
                  min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
        """Directories a crash left (the agent killed between writing them and the
        container's create, or between a VM's build and its boot): of VM builds (a
        ``secrets/`` inside) or of containers, none of ``in_use``, older than
        ``min_age_s`` (one being made now by ``mcp --local`` is young)."""
        try:
            entries = list(self.base.iterdir())
        except FileNotFoundError:
            return []
        used = {Path(p).relative_to(self.base).parts[0] for p in in_use if self.owns(p)
                and Path(p) != self.base}
        now = time.time()
        out = []
        for d in entries:
            try:
                young = now - d.lstat().st_mtime < min_age_s
            except FileNotFoundError:
                continue
            if d.is_dir() and not d.is_symlink() and d.name not in used and not young and \
                    (d / "secrets").is_dir() == vm:
                out.append(d)
        return out

    def reap(self, dirs: Iterable[Path]) -> None:
        for d in dirs:
            log.info("secrets: removing %s, left by an agent that stopped before using it", d)
            shutil.rmtree(d, ignore_errors=True)

    def release(self, paths: Iterable[str]) -> None:
        """Remove the workload directories ``paths`` (bind sources, image files) lie in."""
        for p in paths:
            if self.owns(p) and Path(p) != self.base:
                rel = Path(p).relative_to(self.base)
                shutil.rmtree(self.base / rel.parts[0], ignore_errors=True)


def vm_build(dirs: SecretDirs, spec: WorkloadSpec, source: Source | None, vms_dir: Path,
             prefix: str) -> tuple[Path, tuple[str, ...], tuple[tuple[str, Path], ...]]:
    """Where a VM's image is built, its env and its secret files: a VM that uses none is
    built under ``vms_dir`` as before; one that does, in a new tmpfs directory (0700)
    holding its secret files (``secrets/<name>``, 0400), removed once qemu runs."""
    vms_dir.mkdir(parents=True, exist_ok=True)
    if not uses_secrets(spec):
        return Path(tempfile.mkdtemp(dir=vms_dir, prefix=prefix)), spec.env, ()
    env = resolved_env(spec, source)
    files = file_values(spec, source)
    d = dirs.make(spec.name)
    try:
        (d / "secrets").mkdir(mode=0o700)
        out = []
        for name, value in files.items():
            path = d / "secrets" / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
            out.append((name, path))
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d, env, tuple(out)
