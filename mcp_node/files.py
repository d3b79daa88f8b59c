"""Files the agent keeps and reads: crash-safe writes, locks, /proc lookups."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("mcp_node.files")


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file + fsync + rename + directory fsync, created with ``mode``.

    A crash leaves either the old file or the new one, never a torn one; the
    mode is set on the descriptor, so a secret is never briefly wider than 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def lock_held(path: Path) -> bool:
    """Whether another process holds an exclusive flock on ``path``: a shared one, let go
    at once, is refused while it stands (nothing is written, nothing is made)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def flocked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (made 0600): every holder, in any process, waits.

    With ``wait=False`` it yields False at once, holding nothing, when another has it.
    A holder may unlink the file before it lets go (a lock of a name now gone); one that
    waited on that file then finds a different file (or none) at ``path`` and opens again,
    so two never hold "the" lock at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)


def read_cmdline(pid: int) -> list[str]:
    """argv of a live process; [] if gone (a zombie has an empty cmdline).

    Checked before trusting a pidfile: a reused pid belongs to some other program.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def node_id(state_dir: Path) -> str:
    """A stable id for this agent's state; labels its workloads as its own."""
    path = state_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        ident = secrets.token_hex(6)
        atomic_write(path, (ident + "\n").encode(), 0o644)
        return ident


def unlink_quietly(*paths: Path) -> None:
    """Remove files that may be gone already; a failure is logged, never raised (clean-up
    after a failed step must not hide that step's error)."""
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", p, exc)


def host_memory_mb() -> int:
    """The host's memory in MiB (MemTotal), as the VM runtime and a fleet record count it."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def default_node_name() -> str:
    """The host name's first label as a node name ([a-z0-9-], at most 63)."""
    import socket

    label = socket.gethostname().split(".", 1)[0].lower()
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in label)[:63] or "node"
