"""Times on log lines (issue 22 row 11): one spelling, so lines of several components
sort by their text, and ``--since`` read as a duration or an RFC 3339 time.

Every runtime asked for ``timestamps`` starts each line with a *key*: the UTC time as
``YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`` (always nine digits, always ``Z``) and a space.
Podman writes its own times (a ``k8s-file`` entry's, local with an offset, or the
API's RFC 3339 with trailing zeros cut), which ``key_of`` brings to that form. A
leaf: no import of the runtimes or the agent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from .errors import ValidationError

KEY_LEN = 30   # len("2026-12-03T00:04:46.123456789Z")
_TIME_RE = (r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
            r"(Z|[+-][0-9]{2}:[0-9]{2})")   # ASCII digits: \d would take any script's
_TIME = re.compile(_TIME_RE.encode() + rb"$")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
# What ``since`` may be, exactly (the OpenAPI document's pattern too, so what it admits
# the agent takes): empty, a duration, or a real date and time (no 30 February, no
# year 0) with an offset under a day.
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = (r"(?!0000)(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
         r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
         rf"|{_LEAP}-02-29)")
_CLOCK = (r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
          r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])")
SINCE_PATTERN = re.sub(r"\((?!\?)", "(?:",   # no capturing groups in the document
                       rf"^(?:|(?:{_DURATION.pattern})+|{_DATE}T{_CLOCK})$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def key_of(stamp: bytes) -> bytes | None:
    """``stamp`` (RFC 3339, any offset, up to nanoseconds) as a key; None if it is not one."""
    m = _TIME.match(stamp)
    if m is None:
        return None
    whole, frac, zone = m.group(1), (m.group(2) or b"").ljust(9, b"0"), m.group(3)
    try:   # a real date and time (no month 13), brought to UTC
        t = datetime.fromisoformat((whole + (b"+00:00" if zone == b"Z" else zone)).decode())
    except ValueError:
        return None
    if t.utcoffset():
        try:
            whole = t.astimezone(UTC).replace(tzinfo=None).isoformat().encode()
        except OverflowError:   # past year 1 or 9999 in UTC: the first or last time there is
            whole = b"0001-01-01T00:00:00" if t.year == 1 else b"9999-12-31T23:59:59"
    return whole + b"." + frac + b"Z"


def key_at(t: float) -> bytes:
    """The key of a unix time (what the agent stamps on a line no runtime timed)."""
    ns = int(round(t * 1e9))
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
            + f".{ns % 1_000_000_000:09d}Z").encode()


def parse_since(text: str, now: float) -> bytes:
    """``--since``: a duration back from ``now`` (``10m``, ``1h30m``, ``45s``, ``2d``) or an
    RFC 3339 time (``2026-01-02T15:04:05Z``); its key. Raises ValidationError."""
    s = text
    if s and re.fullmatch(rf"(?:{_DURATION.pattern})+", s):
        back = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(s))
        return key_at(max(0.0, now - back))   # further back than 1970: all of it
    key = key_of(s.encode()) if re.fullmatch(SINCE_PATTERN, s) else None
    if key is None:
        raise ValidationError(f"{text!r} is neither a duration (10m, 1h30m, 45s) nor an "
                              "RFC 3339 time (2026-01-02T15:04:05Z)", "since")
    return key


def split_stamp(line: bytes) -> tuple[bytes, bytes]:
    """(key, text) of a stamped line; a line without one (the agent's cut notice) has
    the key b"", so it sorts first."""
    if len(line) > KEY_LEN and line[KEY_LEN:KEY_LEN + 1] == b" " and line[KEY_LEN - 1:KEY_LEN] \
            == b"Z":
        return line[:KEY_LEN], line[KEY_LEN + 1:]
    return b"", line


class Relined:
    """The lines of a chunk stream, each passed through ``each`` (None drops it); a last
    line without its newline is passed at the end. ``close`` is the inner stream's, so
    it may still be called from any thread (``httpapi.StreamPump``)."""

    def __init__(self, inner: Iterator[bytes], each: Callable[[bytes], bytes | None]) -> None:
        self.inner, self.each, self.rest = inner, each, b""
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self.done:
            try:
                chunk = next(self.inner)
            except StopIteration:
                self.done = True
                rest, self.rest = self.rest, b""
                out = self.each(rest + b"\n") if rest else None
                if out:
                    return out
                break
            data = self.rest + chunk
            cut = data.rfind(b"\n") + 1
            self.rest = data[cut:]
            kept = [o for line in data[:cut].splitlines(keepends=True)
                    if (o := self.each(line)) is not None]
            if kept:
                return b"".join(kept)
        raise StopIteration

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def normalized(inner: Iterator[bytes]) -> Relined:
    """Lines stamped by a runtime in its own spelling of the time, as keys."""
    def each(line: bytes) -> bytes:
        stamp, _, text = line.partition(b" ")
        key = key_of(stamp)
        return key + b" " + text if key is not None else line
    return Relined(inner, each)


def kept(since: bytes | None, timestamps: bool) -> Callable[[bytes], bytes | None]:
    """For one component's stamped lines: drop those before ``since``, and the stamp
    itself unless ``timestamps``."""
    def each(line: bytes) -> bytes | None:
        key, text = split_stamp(line)
        if since is not None and key and key < since:
            return None
        return line if timestamps or not key else text
    return each


class Stamped(Relined):
    """The lines of a log that records no times (a VM's serial console), stamped by the
    agent: what was there when the read began with ``started_at`` (the run's start, the
    earliest those lines can be), followed output with the time it was read.
    ``snapshot()`` tells which the next chunk is (``LogTail.in_snapshot``)."""

    def __init__(self, inner: Iterator[bytes], snapshot: Callable[[], bool],
                 started_at: float) -> None:
        super().__init__(inner, self._stamp)
        self.snapshot, self.first, self.key = snapshot, key_at(started_at), b""

    def __next__(self) -> bytes:
        self.key = self.first if self.snapshot() else key_at(time.time())
        return super().__next__()

    def _stamp(self, line: bytes) -> bytes:
        return line if line.startswith(b"[mcp: ") else self.key + b" " + line
