"""Extract a component's ELF from an OCI image with the podman CLI.

``podman create`` + ``podman cp`` + ``podman rm`` works as root and rootless,
needs no OCI runtime (nothing is started) and no image mount privileges.
The image's own command (Entrypoint/Cmd) decides the program's arguments.

A redeploy should not pay a podman call (~30 ms, more under load) to learn that
nothing changed: containers/storage rewrites its image index
(``<graphRoot>/<driver>-images/images.json``) whenever an image is added, removed
or (re)tagged, so while that file's stamp is the one recorded with an extraction,
the extraction stands. Where the index cannot be found, every pull asks podman.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from .errors import ImageError
from .files import atomic_write
from .registries import PullAuth, Registries, classify, registry_of
from .vmimage import elf_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PulledELF:
    image: str
    binary: str                     # path inside the image
    argv: tuple[str, ...]           # arguments after argv[0]
    image_id: str
    elf_sha256: str
    entrypoint: tuple[str, ...] = ()   # the image's own command, to re-derive argv
    image_cmd: tuple[str, ...] = ()
    store_stamp: str = ""           # image index stamp when it was extracted ("" unknown)


def podman_argv(podman: str, *args: str) -> list[str]:
    return [podman, *args]


class Podman:
    """The podman CLI, logged; CONTAINERS_CONF from config when set."""

    def __init__(self, binary: str = "podman", containers_conf: str = "",
                 registries: Registries | None = None) -> None:
        self.binary = binary
        self.registries = registries    # each pull's login and CA (issue 20)
        self.env = dict(os.environ)
        if containers_conf:
            self.env["CONTAINERS_CONF"] = containers_conf

        self._index: Path | None = None
        self._index_known = False

    def image_index(self) -> Path | None:
        """containers/storage's image index file, from ``podman info`` (asked once)."""
        if not self._index_known:
            self._index_known = True
            try:
                proc = self.run("info", "--format",
                                "{{.Store.GraphRoot}}\t{{.Store.GraphDriverName}}",
                                check=False, timeout=60)
            except ImageError as exc:
                log.info("podman info failed (%s); every pull asks podman", exc)
                return None
            root, _, driver = proc.stdout.decode(errors="replace").strip().partition("\t")
            index = Path(root) / f"{driver}-images" / "images.json"
            if proc.returncode == 0 and root.startswith("/") and driver and index.is_file():
                self._index = index
            else:
                log.info("podman image index not found (%r); every pull asks podman", root)
        return self._index

    def store_stamp(self) -> str:
        """Changes whenever the image store does; "" when it cannot be told."""
        index = self.image_index()
        if index is None:
            return ""
        try:
            st = index.stat()
        except OSError:
            return ""
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        argv = podman_argv(self.binary, *args)
        log.info("run: %s", " ".join(argv))
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=self.env,
                                  check=False, pass_fds=pass_fds)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"podman {args[0]} failed: {exc}") from exc
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-600:]
            raise ImageError(f"podman {' '.join(args[:2])} exited {proc.returncode}: {err}")
        return proc


@contextlib.contextmanager
def _auth_fd(auth: PullAuth) -> Iterator[int | None]:
    """The login as a containers-auth.json in a memfd (on no disk, in no argv)."""
    if auth.cred is None:
        yield None
        return
    fd = os.memfd_create("mcp-registry-auth", os.MFD_CLOEXEC)
    try:
        os.write(fd, auth.cred.auth_json(auth.host))
        yield fd
    finally:
        os.close(fd)


def pull_image(podman: Podman, image: str, component: str = "") -> None:
    """``podman pull`` with the registry's login (``--authfile`` a memfd) and CA
    (``--cert-dir``) when ``[registries]`` names it: ImageError naming the registry, the
    image and the key to set when it is refused (registries.classify)."""
    auth = (podman.registries.for_image(image) if podman.registries is not None
            else PullAuth(image, registry_of(image), None, None, None))
    args = ["pull", *(("--cert-dir", str(auth.cert_dir)) if auth.cert_dir else ())]
    with _auth_fd(auth) as fd:
        if fd is not None:
            args += ["--authfile", f"/proc/self/fd/{fd}"]
        proc = podman.run(*args, image, timeout=600, check=False,
                          pass_fds=(fd,) if fd is not None else ())
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-600:]
        raise classify(auth, err or f"exited {proc.returncode}", component)


def remove_image(podman: Podman, digest: str, names: frozenset[str]) -> str:
    """As ``Runtime.remove_image``, with the podman CLI (never forced: podman refuses
    an image a container uses)."""
    try:
        proc = podman.run("image", "inspect", "--format", "json", digest, check=False)
        if proc.returncode != 0:
            return "not present"
        tags = set(json.loads(proc.stdout)[0].get("RepoTags") or [])
        foreign = sorted(tags - names)
        if foreign:
            return f"it also has the name {foreign[0]}"
        proc = podman.run("rmi", digest, check=False)
    except (ImageError, ValueError, IndexError, AttributeError) as exc:
        return str(exc)
    if proc.returncode != 0:
        return proc.stderr.decode(errors="replace").strip()[-200:] or "podman rmi failed"
    return ""


def choose_binary(spec_binary: str, component: str, entrypoint: list[str], cmd: list[str],
                  spec_cmd: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The ELF path and its arguments: ``binary``, else Entrypoint[0], else
    /usr/local/bin/<component>. Arguments: the definition's cmd, else the image's."""
    if spec_binary:
        return spec_binary, tuple(spec_cmd)
    if entrypoint:
        return entrypoint[0], (*entrypoint[1:], *(spec_cmd or cmd))
    return f"/usr/local/bin/{component}", tuple(spec_cmd)


def unchanged(podman: Podman, image: str, spec_binary: str, component: str,
              spec_cmd: tuple[str, ...], dest: Path, cached: PulledELF | None
              ) -> PulledELF | None:
    """The cached extraction, argv re-derived for ``spec_cmd``, if the image store has not
    changed since it was made (and ``dest`` is still there); else None."""
    if cached is None or cached.image != image or not cached.store_stamp:
        return None
    if podman.store_stamp() != cached.store_stamp or not dest.is_file():
        return None
    binary, argv = choose_binary(spec_binary, component, list(cached.entrypoint),
                                 list(cached.image_cmd), spec_cmd)
    if binary != cached.binary:
        return None
    return PulledELF(image=image, binary=binary, argv=argv, image_id=cached.image_id,
                     elf_sha256=cached.elf_sha256, entrypoint=cached.entrypoint,
                     image_cmd=cached.image_cmd, store_stamp=cached.store_stamp)


def extract_elf(podman: Podman, image: str, spec_binary: str, component: str,
                spec_cmd: tuple[str, ...], dest: Path,
                cached: PulledELF | None = None) -> PulledELF:
    """Pull ``image`` if needed and copy its ELF to ``dest`` (atomically).

    ``cached`` is what an earlier extraction to ``dest`` found: while the image store is
    unchanged, no podman call is made at all; when the image id and the binary are the
    same and ``dest`` still hashes to it, nothing is copied again (one podman call
    instead of four).
    """
    same = unchanged(podman, image, spec_binary, component, spec_cmd, dest, cached)
    if same is not None:
        return same
    stamp = podman.store_stamp()   # before inspecting: a change meanwhile is seen next time
    proc = podman.run("image", "inspect", "--format", "json", image, check=False)
    if proc.returncode != 0:
        pull_image(podman, image, component)
        stamp = podman.store_stamp()
        proc = podman.run("image", "inspect", "--format", "json", image)
    raw = proc.stdout
    try:
        info = json.loads(raw)[0]
    except (ValueError, IndexError, KeyError) as exc:
        raise ImageError(f"podman image inspect {image}: unreadable output") from exc
    conf = info.get("Config") or {}
    entrypoint = tuple(str(a) for a in conf.get("Entrypoint") or [])
    image_cmd = tuple(str(a) for a in conf.get("Cmd") or [])
    binary, argv = choose_binary(spec_binary, component, list(entrypoint), list(image_cmd),
                                 spec_cmd)
    if not PurePosixPath(binary).is_absolute():
        raise ImageError(f"binary {binary!r} of image {image} is not an absolute path")
    image_id = str(info.get("Id", ""))

    def found(elf_sha256: str) -> PulledELF:
        return PulledELF(image=image, binary=binary, argv=argv, image_id=image_id,
                         elf_sha256=elf_sha256, entrypoint=entrypoint, image_cmd=image_cmd,
                         store_stamp=stamp)

    if (cached is not None and image_id and cached.image_id == image_id
            and cached.binary == binary and dest.is_file()
            and hashlib.sha256(dest.read_bytes()).hexdigest() == cached.elf_sha256):
        return found(cached.elf_sha256)
    name = f"mcp-extract-{secrets.token_hex(6)}"
    podman.run("create", "--pull=never", "--name", name, "--entrypoint", "/mcp-extract", image)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            out = Path(tmp) / "app"
            path = binary
            for _hop in range(8):   # follow symlinks inside the image
                proc = podman.run("cp", f"{name}:{path}", str(out), check=False)
                if proc.returncode != 0:
                    err = proc.stderr.decode(errors="replace").strip()[-300:]
                    raise ImageError(f"{binary} not found in image {image}: {err}")
                if not out.is_symlink():
                    break
                target = PurePosixPath(os.readlink(out))
                out.unlink()
                path = str(target if target.is_absolute() else PurePosixPath(path).parent / target)
            if out.is_symlink() or not out.is_file():
                raise ImageError(f"{binary} in image {image} is not a regular file")
            data = out.read_bytes()
            elf_info(data, f"{binary} in image {image}")
            os.chmod(out, 0o755)  # noqa: S103 - an executable
            os.replace(out, dest)
    finally:
        podman.run("rm", "-f", name, check=False)
    return found(hashlib.sha256(data).hexdigest())


class ElfCache:
    """Extracted ELFs under ``<state>/vm-cache``, keyed by image, binary and component,
    each beside the record of what it was extracted from, so a redeploy asks podman
    nothing while the image store is unchanged (``extract_elf`` decides)."""

    GRACE_S = 600.0   # an entry this recently used survives a prune (its run may follow)

    def __init__(self, podman: Podman, cache_dir: Path) -> None:
        self.podman = podman
        self.dir = cache_dir

    @staticmethod
    def key(image: str, binary: str, component: str) -> str:
        return hashlib.sha256(f"{image}\0{binary}\0{component}".encode()).hexdigest()[:24]

    def fetch(self, image: str, binary: str, component: str,
              cmd: tuple[str, ...]) -> tuple[PulledELF, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        key = self.key(image, binary, component)
        elf, record = self.dir / f"{key}.elf", self.dir / f"{key}.json"
        cached = self._cached(record)
        pulled = extract_elf(self.podman, image, binary, component, cmd, elf, cached)
        os.utime(elf)  # podman cp keeps the image's mtime; the cache prunes by last use
        if pulled != cached:
            atomic_write(record, json.dumps(asdict(pulled)).encode(), 0o644)
        return pulled, elf

    @staticmethod
    def _cached(record: Path) -> PulledELF | None:
        try:
            old = json.loads(record.read_bytes())
            return PulledELF(**{**old, **{k: tuple(old.get(k, ())) for k in (
                "argv", "entrypoint", "image_cmd")}})
        except (OSError, ValueError, TypeError):
            return None

    def prune(self) -> None:
        """Entries untouched for GRACE_S go: a deploy of another service between its pull
        and its run must not lose the ELF it just extracted."""
        if not self.dir.exists():
            return
        cutoff = time.time() - self.GRACE_S
        for entry in self.dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
