"""Reading the end of a log file in bounded steps (issue 16).

A log read answers at most ``tail`` lines and ``max_bytes`` bytes (``server.max_log_bytes``),
the newest ones. The start is found by reading backwards from the end in ``CHUNK``
steps, never further back than what the answer can hold, and the answer is then read
forwards in the same steps: memory per read is a chunk, whatever the log's size. Two
formats: a plain file (a VM's serial console, CRLF made LF) and podman's ``k8s-file``
log (``TIME STREAM F|P TEXT`` entries; ``P`` is a part of a line, ``F`` ends it), read
here instead of through podman, which holds the whole tail in memory.

When the byte cap cuts earlier output, the answer's first line says so (``NOTICE``);
it counts towards the cap.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from .logtime import key_of

CHUNK = 64 << 10
POLL_S = 0.25
# How long a follow goes on while its writer's state cannot be read (podman busy or
# restarting): a transient failure must not end a follow of a container that still runs.
UNKNOWN_LIMIT_S = 30.0
Format = Literal["plain", "k8s"]


def notice(max_bytes: int) -> bytes:
    return (f"[mcp: earlier output cut: a logs answer holds at most {max_bytes} bytes "
            "(server.max_log_bytes)]\n").encode()


class Segments:
    """Files read as one (a rotated part first), each up to the size it had when opened:
    a snapshot, so what is written later is for follow."""

    def __init__(self, paths: list[Path]) -> None:
        self.files: list[tuple[BinaryIO, int, int]] = []    # (file, start, size)
        self.size = 0
        self.last_ino: int | None = None
        for p in paths:
            try:
                f = p.open("rb")
            except OSError:
                continue
            st = os.fstat(f.fileno())
            self.files.append((f, self.size, st.st_size))
            self.size += st.st_size
            self.last_ino = st.st_ino if p == paths[-1] else self.last_ino
        self.last_start = self.files[-1][1] if self.files and self.last_ino is not None \
            else self.size

    def read_at(self, offset: int, n: int) -> bytes:
        out = []
        for f, start, size in self.files:
            if n <= 0:
                break
            if offset < start + size and offset + n > start:
                f.seek(offset - start)
                data = f.read(min(n, start + size - offset))
                out.append(data)
                offset += len(data)
                n -= len(data)
        return b"".join(out)

    def line_end(self) -> int:
        """Just after the last complete line (an entry being written is left for later)."""
        pos = self.size
        while pos > 0:
            n = min(CHUNK, pos)
            i = self.read_at(pos - n, n).rfind(b"\n")
            if i >= 0:
                return pos - n + i + 1
            pos -= n
        return 0

    def close(self) -> None:
        for f, _, _ in self.files:
            f.close()
        self.files = []


def plain_start(seg: Segments, end: int, tail: int | None, budget: int) -> tuple[int, bool]:
    """(where the answer starts, whether the byte cap cut earlier output): the start of
    the ``tail``-th line from the end, but no further back than ``budget`` bytes."""
    floor = max(0, end - budget)
    if tail == 0 or end == 0:
        return end, False
    if tail is None:
        return floor, floor > 0
    count = tail + (seg.read_at(end - 1, 1) == b"\n")   # a final newline starts no line
    low = max(0, floor - 1)        # a newline just before the floor: the line fits exactly
    pos = end
    while pos > low:
        n = min(CHUNK, pos - low)
        pos -= n
        buf = seg.read_at(pos, n)
        i = len(buf)
        while (i := buf.rfind(b"\n", 0, i)) >= 0:
            count -= 1
            if count == 0:
                start = pos + i + 1
                return (start, False) if start >= floor else (floor, True)
    return floor, floor > 0


def k8s_entry(line: bytes) -> tuple[bytes, bool]:
    """(text with its newline if the entry ends a line, whether it ends one)."""
    parts = line.split(b" ", 3)
    if len(parts) >= 3 and parts[2][:1] in (b"F", b"P"):
        full = parts[2][:1] == b"F"
        text = parts[3] if len(parts) == 4 else b""
        return (text + b"\n", True) if full else (text, False)
    return line + b"\n", True      # not an entry: shown as it is


def k8s_start(seg: Segments, end: int, tail: int | None, budget: int) -> tuple[int, bool]:
    """As ``plain_start`` for a k8s-file log (``end`` after a complete entry): lines
    and bytes are counted in what the entries hold, walking back one entry at a time."""
    if tail == 0:
        return end, False
    start, out, lines, rest, pos = end, 0, 0, b"", end
    while pos > 0:
        n = min(CHUNK, pos)
        pos -= n
        buf = seg.read_at(pos, n) + rest    # ends with a newline (or is the end)
        first = 0 if pos == 0 else buf.find(b"\n") + 1
        if pos > 0 and first == 0:          # no newline at all in this chunk
            if len(buf) > budget + CHUNK:    # an entry longer than the answer can hold
                return start, True
            rest = buf
            continue
        j = len(buf)
        while j > first:
            i = max(buf.rfind(b"\n", first, j - 1) + 1, first)
            text, full = k8s_entry(buf[i:j - 1])
            starts_line = full or lines == 0
            if starts_line and tail is not None and lines >= tail:
                return start, False
            if out + len(text) > budget:
                return start, True
            out += len(text)
            lines += starts_line
            start, j = pos + i, i
        rest = buf[:first]
    return start, False


class Lf:
    """Serial console (a tty, CRLF) to LF; a CR at a chunk's end waits for the next."""

    def __init__(self) -> None:
        self.cr = False

    def feed(self, data: bytes) -> bytes:
        if self.cr:
            data = b"\r" + data
        self.cr = data.endswith(b"\r")
        return (data[:-1] if self.cr else data).replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        cr, self.cr = self.cr, False
        return b"\r" if cr else b""


class K8s:
    """k8s-file entries to their text; an entry without its newline waits for the rest.
    ``stamps``: each line starts with its first entry's time (``logtime`` key)."""

    def __init__(self, stamps: bool = False) -> None:
        self.rest = b""
        self.stamps, self.mid = stamps, False

    def feed(self, data: bytes) -> bytes:
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        self.rest = data[cut:]
        if not cut:
            return b""
        lines = data[:cut - 1].split(b"\n")
        if not self.stamps:
            return b"".join(k8s_entry(line)[0] for line in lines)
        out = []
        for line in lines:
            text, full = k8s_entry(line)
            if not self.mid:
                key = key_of(line.split(b" ", 1)[0])
                out.append(key + b" " + text if key is not None else text)
            else:
                out.append(text)
            self.mid = not full
        return b"".join(out)

    def flush(self) -> bytes:
        return b""


class LogTail:
    """The answer of one log read, an iterator of chunks: the cut notice if any, the
    snapshot's end, then (``follow``) what the last file gets next, until ``alive()``
    says its writer is gone or ``close()`` is called (from any thread). ``alive()`` answers
    None when it cannot tell now; ``UNKNOWN_LIMIT_S`` of that in a row ends the follow too."""

    def __init__(self, paths: list[Path], fmt: Format, tail: int | None,
                 max_bytes: int | None, follow: bool = False,
                 alive: Callable[[], bool | None] = lambda: False,
                 alive_every_s: float = POLL_S, unknown_limit_s: float = UNKNOWN_LIMIT_S,
                 stamps: bool = False) -> None:
        self._seg = Segments(paths)
        self._path = paths[-1]
        self._fmt: Lf | K8s = Lf() if fmt == "plain" else K8s(stamps)
        end = self._seg.size if fmt == "plain" else self._seg.line_end()
        cap = max_bytes if max_bytes is not None else 1 << 62
        note = notice(cap)
        find = plain_start if fmt == "plain" else k8s_start
        try:
            start, cut = find(self._seg, end, tail, max(cap - len(note), 0))
        except BaseException:
            self._seg.close()
            raise
        self._pending = note if cut else b""
        self._pos, self._end = start, end
        self._ino = self._seg.last_ino
        self._fpos = end - self._seg.last_start    # where follow goes on in the last file
        self._follow, self._alive, self._alive_every = follow, alive, alive_every_s
        self._unknown_limit = unknown_limit_s
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self._closed.is_set():
            if self._pending:
                out, self._pending = self._pending, b""
                return out
            with self._lock:
                if self._closed.is_set():
                    break
                if self._pos < self._end:
                    data = self._seg.read_at(self._pos, min(CHUNK, self._end - self._pos))
                    self._pos = self._pos + len(data) if data else self._end   # shrunk: done
                    out = self._fmt.feed(data)
                    if out:
                        return out
                    continue
                self._seg.close()
            if not self._follow:
                break
            new = self._poll()
            if new is None:
                break
            if new:
                return new
        self.close()
        rest = self._fmt.flush()
        if rest:
            return rest
        raise StopIteration

    def _read_new(self) -> bytes | None:
        """What the last file got since; None once it is gone."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        if st.st_ino != self._ino or st.st_size < self._fpos:   # rotated or truncated
            self._ino, self._fpos = st.st_ino, 0
        if st.st_size <= self._fpos:
            return b""
        with self._path.open("rb") as f:
            f.seek(self._fpos)
            chunk = f.read(CHUNK)
        self._fpos += len(chunk)
        return chunk

    def _poll(self) -> bytes | None:
        """The next output of the followed file (b"" if none came for a while), or None
        once its writer is gone and everything it wrote was read."""
        checked, unknown_since = 0.0, None
        while not self._closed.is_set():
            chunk = self._read_new()
            if chunk is None:
                return None
            if chunk:
                return self._fmt.feed(chunk)
            now = time.monotonic()
            if now - checked >= self._alive_every:
                checked = now
                state = self._alive()
                unknown_since = (unknown_since or now) if state is None else None
                if state is False or (unknown_since is not None
                                      and now - unknown_since >= self._unknown_limit):
                    last = self._read_new()       # what it wrote just before it went
                    return self._fmt.feed(last) if last else None
            self._closed.wait(POLL_S)
        return None

    @property
    def in_snapshot(self) -> bool:
        """The next chunk is of what was there when the read began, not followed output."""
        return bool(self._pending) or self._pos < self._end

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._seg.close()


def keep_last(chunks: Iterator[bytes], max_bytes: int) -> Iterator[bytes]:
    """For a log only podman can read (journald, or a file we may not open): the last
    ``max_bytes`` of its output, holding no more than that (podman's side is not bounded
    then)."""
    kept: deque[bytes] = deque()
    size, cut = 0, False
    note = notice(max_bytes)
    budget = max(max_bytes - len(note), 0)
    try:
        for c in chunks:
            kept.append(c)
            size += len(c)
            while size > budget:
                cut = True
                over = size - budget
                if len(kept[0]) <= over:
                    size -= len(kept.popleft())
                else:
                    kept[0] = kept[0][over:]
                    size -= over
    finally:
        with contextlib.suppress(Exception):
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
    if cut:
        yield note
    yield from kept
