"""Can the agent still write its state directory? Probed every monitor round.

The registry, tokens, locks and the podman service's files live there: a full or
read-only filesystem makes every deploy fail while the workloads already running
look fine, so health must say so (and name the directory) before an operator
finds out from a failed deploy. Two looks: statvfs's free space against a
threshold, and a write of a small file (a full tmpfs or a read-only remount
refuses it, whatever statvfs says).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

MIN_FREE_BYTES = 64 * 1024 * 1024    # below this (or MIN_FREE_FRACTION of a small fs): low
MIN_FREE_FRACTION = 0.05
PROBE_NAME = ".write-probe"


def low_space(free: int, total: int) -> bool:
    """Below 64 MiB free, or below 5 % on a filesystem smaller than 1.28 GiB."""
    return free < min(MIN_FREE_BYTES, int(total * MIN_FREE_FRACTION))


def probe(directory: Path) -> list[str]:
    """Reasons the state dir is unfit (empty when it is fine); never raises."""
    reasons: list[str] = []
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return [f"state dir {directory}: cannot stat its filesystem "
                f"({os.strerror(exc.errno or 0) or type(exc).__name__})"]
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if st.f_flag & os.ST_RDONLY:
        return [f"state dir {directory}: its filesystem is mounted read-only; "
                "deploys and registry writes fail"]
    if total and low_space(free, total):
        reasons.append(f"state dir {directory}: filesystem nearly full "
                       f"({free // 1024} KiB free of {total // 1024} KiB)")
    path = directory / PROBE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"probe\n" * 64)
        finally:
            os.close(fd)
    except OSError as exc:
        what = {errno.ENOSPC: "no space left", errno.EROFS: "read-only filesystem",
                errno.EDQUOT: "disk quota exceeded"}.get(exc.errno or 0,
                                                         os.strerror(exc.errno or 0))
        reasons.append(f"state dir {directory}: a test write failed ({what}); "
                       "deploys and registry writes fail")
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return reasons
