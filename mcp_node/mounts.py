"""The host side of volumes at the moment a workload starts: whether a bind source is
still the directory it was resolved to, and what a running container has mounted.

podman (runc) resolves a bind source again at each start, so the runtimes look before
(``moved_source``) and after (``mounted_ident``) each start; see grammar.resolve_volumes
for the check at create and boot.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from .grammar import within_roots

Ident = tuple[int, int]   # (st_dev, st_ino)


def path_ident(path: str) -> Ident | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def mounted_ident(pid: int, guest: str) -> Ident | None:
    """What a running container has on ``guest``, read through ``/proc/<pid>/root``
    without following a symlink inside it (one would resolve against the agent's root);
    None when that cannot be read."""
    path = f"/proc/{pid}/root"
    try:
        for part in guest.strip("/").split("/"):
            path = f"{path}/{part}"
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return None
    except OSError:
        return None
    return path_ident(path)


def moved_source(sources: Iterable[str], roots: Sequence[str]) -> str:
    """The first source that is no longer its own resolved path under the roots (a
    directory on it swapped for a symlink, or the roots narrowed), with what it is now;
    "" when every one holds."""
    for source in sources:
        try:
            real = os.path.realpath(source, strict=True)
        except (OSError, ValueError) as exc:
            return f"{source} ({exc})"
        if real != source or not within_roots(real, roots):
            return f"{source} (now {real})"
    return ""
